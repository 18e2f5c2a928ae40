-- The txgate-10k-users load: every request carries the bearer token of a caller picked at
-- random from TOKEN_FILE (one token per line), so requests spread over all cached entries.
-- Each wrk thread loads the file into its own Lua state and builds every header value once;
-- a request then costs one random pick and one wrk.format.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local headers = {}
local count = 0

function init(args)
   local path = os.getenv("TOKEN_FILE")
   if not path then
      error("TOKEN_FILE is not set")
   end
   for line in io.lines(path) do
      if #line > 0 then
         count = count + 1
         headers[count] = { ["Authorization"] = "Bearer " .. line }
      end
   end
   if count == 0 then
      error("no tokens in " .. path)
   end
   -- Threads must not walk the same sequence.
   math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16) % 100000)
end

function request()
   return wrk.format(nil, nil, headers[math.random(count)])
end
