//! Reading the expanded YAML tree into the [`super::file`] types, with an error type of our own.
//!
//! serde tells a deserializer's error type what went wrong in structured calls:
//! [`de::Error::unknown_field`] gets the key and the keys the section accepts,
//! [`de::Error::missing_field`] the key, [`de::Error::unknown_variant`] the value and the values
//! allowed. `serde_yaml`'s deserializer writes those facts into its own sentence at once, so a
//! message made after it could only be an edit of another crate's wording, broken the day that
//! wording changes. [`Node`] reads the same tree with [`FileError`] as its error type, which keeps
//! the facts as data; the messages users see (and `tests/docs.rs` reads the accepted keys back
//! from) are written here.
//!
//! [`Node`] reads the tree the way `serde_yaml::Value` does: a tag (`!name`) counts only where an
//! enum is read and is ignored elsewhere, and a null is an empty list or map.

use std::fmt;

use serde::de::value::{MapDeserializer, SeqDeserializer, StrDeserializer};
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, Unexpected,
    VariantAccess, Visitor,
};
use serde_yaml::Value;
use serde_yaml::value::TaggedValue;

/// Why the tree does not fit the file types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileError {
    /// A key its section does not have: a typo, or a key of another section.
    UnknownKey {
        key: String,
        expected: &'static [&'static str],
    },
    /// A required key that is absent.
    MissingKey { key: &'static str },
    /// A value outside its enumeration (`mode: impersonate`).
    UnknownValue {
        value: String,
        expected: &'static [&'static str],
    },
    /// Anything else, in the words of the type that refused the value: a wrong type (serde's
    /// `invalid type: …, expected …`) or a duration humantime does not read (ours, in
    /// [`super::file`]).
    Other(String),
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::UnknownKey { key, expected } => {
                write!(f, "unknown key `{key}`, ")?;
                write_expected(f, expected, "this section has no keys")
            }
            FileError::MissingKey { key } => write!(f, "missing key `{key}`"),
            FileError::UnknownValue { value, expected } => {
                write!(f, "unknown value `{value}`, ")?;
                write_expected(f, expected, "no value is allowed")
            }
            FileError::Other(message) => f.write_str(message),
        }
    }
}

/// "expected " and the names, or `none` when there are none.
fn write_expected(f: &mut fmt::Formatter<'_>, names: &[&str], none: &str) -> fmt::Result {
    if names.is_empty() {
        return f.write_str(none);
    }
    f.write_str("expected ")?;
    write_names(f, names)
}

/// "`a`", "`a` or `b`", "one of `a`, `b`, `c`": every allowed name in backticks, which is how
/// `tests/docs.rs` reads them back.
fn write_names(f: &mut fmt::Formatter<'_>, names: &[&str]) -> fmt::Result {
    match names {
        [one] => write!(f, "`{one}`"),
        [first, second] => write!(f, "`{first}` or `{second}`"),
        all => {
            f.write_str("one of ")?;
            for (i, name) in all.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "`{name}`")?;
            }
            Ok(())
        }
    }
}

impl std::error::Error for FileError {}

impl de::Error for FileError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        FileError::Other(message.to_string())
    }

    fn unknown_field(key: &str, expected: &'static [&'static str]) -> Self {
        FileError::UnknownKey {
            key: key.to_string(),
            expected,
        }
    }

    fn missing_field(key: &'static str) -> Self {
        FileError::MissingKey { key }
    }

    fn unknown_variant(value: &str, expected: &'static [&'static str]) -> Self {
        FileError::UnknownValue {
            value: value.to_string(),
            expected,
        }
    }
}

/// `T` read from `tree`. The error carries the key path where reading stopped (`.` for the
/// root), as `serde_path_to_error` writes it.
pub fn from_tree<T: DeserializeOwned>(
    tree: Value,
) -> Result<T, serde_path_to_error::Error<FileError>> {
    serde_path_to_error::deserialize(Node(tree))
}

/// One node of the YAML tree, as a deserializer whose errors are [`FileError`].
pub struct Node(pub Value);

impl Node {
    /// The value without its tags: a tag means something only where an enum is read.
    fn untag(self) -> Value {
        let mut value = self.0;
        while let Value::Tagged(tagged) = value {
            value = tagged.value;
        }
        value
    }
}

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Unexpected::Unsigned(u),
            (None, Some(i), _) => Unexpected::Signed(i),
            (None, None, f) => Unexpected::Float(f.unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Sequence(_) => Unexpected::Seq,
        Value::Mapping(_) => Unexpected::Map,
        Value::Tagged(_) => Unexpected::Enum,
    }
}

/// The values of an enumeration, as what was expected.
struct Variants(&'static [&'static str]);

impl de::Expected for Variants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // serde writes "expected " in front of this.
        if self.0.is_empty() {
            return f.write_str("no value");
        }
        write_names(f, self.0)
    }
}

fn invalid_type(value: &Value, expected: &dyn de::Expected) -> FileError {
    de::Error::invalid_type(unexpected(value), expected)
}

fn visit_sequence<'de, V: Visitor<'de>>(
    items: Vec<Value>,
    visitor: V,
) -> Result<V::Value, FileError> {
    let mut items = SeqDeserializer::new(items.into_iter().map(Node));
    let value = visitor.visit_seq(&mut items)?;
    items.end()?;
    Ok(value)
}

fn visit_mapping<'de, V: Visitor<'de>>(
    map: serde_yaml::Mapping,
    visitor: V,
) -> Result<V::Value, FileError> {
    let mut entries = MapDeserializer::new(map.into_iter().map(|(k, v)| (Node(k), Node(v))));
    let value = visitor.visit_map(&mut entries)?;
    entries.end()?;
    Ok(value)
}

impl<'de> IntoDeserializer<'de, FileError> for Node {
    type Deserializer = Node;

    fn into_deserializer(self) -> Node {
        self
    }
}

/// Scalars read whatever the tag; the visitor refuses a value of the wrong kind itself, in
/// serde's words.
macro_rules! untagged_scalars {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FileError> {
                Node(self.untag()).deserialize_any(visitor)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Node {
    type Error = FileError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FileError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, f) => visitor.visit_f64(f.unwrap_or(f64::NAN)),
            },
            Value::String(s) => visitor.visit_string(s),
            Value::Sequence(items) => visit_sequence(items, visitor),
            Value::Mapping(map) => visit_mapping(map, visitor),
            Value::Tagged(tagged) => visitor.visit_enum(Tagged(*tagged)),
        }
    }

    untagged_scalars! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_identifier
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FileError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            value => visitor.visit_some(Node(value)),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FileError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            value => Err(invalid_type(&value, &visitor)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, FileError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, FileError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FileError> {
        match self.untag() {
            Value::Sequence(items) => visit_sequence(items, visitor),
            Value::Null => visit_sequence(Vec::new(), visitor),
            value => Err(invalid_type(&value, &visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, FileError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, FileError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FileError> {
        match self.untag() {
            Value::Mapping(map) => visit_mapping(map, visitor),
            Value::Null => visit_mapping(serde_yaml::Mapping::new(), visitor),
            value => Err(invalid_type(&value, &visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FileError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FileError> {
        match self.0 {
            Value::String(variant) => visitor.visit_enum(variant.into_deserializer()),
            Value::Tagged(tagged) => visitor.visit_enum(Tagged(*tagged)),
            // The visitor would describe itself by its Rust type name; the values are what a
            // user can write.
            value => Err(invalid_type(&value, &Variants(variants))),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FileError> {
        visitor.visit_unit()
    }
}

/// `!variant value`: the tag names the variant, the value is its content.
struct Tagged(TaggedValue);

impl<'de> EnumAccess<'de> for Tagged {
    type Error = FileError;
    type Variant = Node;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Node), FileError> {
        let TaggedValue { tag, value } = self.0;
        let tag = tag.to_string();
        let name = tag.strip_prefix('!').unwrap_or(&tag);
        let variant = seed.deserialize(StrDeserializer::<FileError>::new(name))?;
        Ok((variant, Node(value)))
    }
}

impl<'de> VariantAccess<'de> for Node {
    type Error = FileError;

    fn unit_variant(self) -> Result<(), FileError> {
        <() as de::Deserialize>::deserialize(self)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, FileError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, FileError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FileError> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Section {
        name: String,
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        items: Vec<u32>,
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    fn read(yaml: &str) -> Result<Section, (String, FileError)> {
        let tree: Value = serde_yaml::from_str(yaml).unwrap();
        from_tree(tree).map_err(|e| (e.path().to_string(), e.into_inner()))
    }

    #[test]
    fn the_facts_of_a_refusal_are_kept_as_data() {
        let (path, error) = read("{ name: a, nmae: b }").unwrap_err();
        assert_eq!(path, "nmae");
        assert_eq!(
            error,
            FileError::UnknownKey {
                key: "nmae".into(),
                expected: &["name", "mode", "items"],
            }
        );
        assert_eq!(
            error.to_string(),
            "unknown key `nmae`, expected one of `name`, `mode`, `items`"
        );
        let (_, error) = read("{ mode: fast }").unwrap_err();
        assert_eq!(error, FileError::MissingKey { key: "name" });
        let (path, error) = read("{ name: a, mode: quick }").unwrap_err();
        assert_eq!(path, "mode");
        assert_eq!(
            error.to_string(),
            "unknown value `quick`, expected `fast` or `slow`"
        );
    }

    #[test]
    fn reads_the_tree_as_serde_yaml_does() {
        let read_ok = |yaml: &str| read(yaml).unwrap();
        assert_eq!(
            read_ok("{ name: !label a, mode: !slow , items: }"),
            Section {
                name: "a".into(),
                mode: Some(Mode::Slow),
                items: Vec::new(),
            }
        );
        assert_eq!(read_ok("{ name: a, items: [1, 2] }").items, [1, 2]);
        let (path, error) = read("{ name: a, items: [1, -2] }").unwrap_err();
        assert_eq!(path, "items[1]");
        assert_eq!(
            error.to_string(),
            "invalid value: integer `-2`, expected u32"
        );
        let (_, error) = read("{ name: a, mode: 5 }").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid type: integer `5`, expected `fast` or `slow`"
        );
        let (_, error) = read("{ name: [a] }").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid type: sequence, expected a string"
        );
    }
}
