//! Sandbox and container ids: 64 lowercase hex characters, resolvable by unique prefix
//! as crictl users expect.

use rand::RngCore;

/// A new random id (256 bits, hex).
pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// What a prefix names among a set of ids.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Exactly one id starts with the prefix (or equals it).
    One(String),
    /// No id starts with it.
    None,
    /// Several do; sorted.
    Ambiguous(Vec<String>),
}

/// Resolves `prefix` among `ids`: an exact match wins, else a unique prefix match.
pub fn resolve<'a>(prefix: &str, ids: impl IntoIterator<Item = &'a String>) -> Resolved {
    if prefix.is_empty() {
        return Resolved::None;
    }
    let mut matches = Vec::new();
    for id in ids {
        if id == prefix {
            return Resolved::One(id.clone());
        }
        if id.starts_with(prefix) {
            matches.push(id.clone());
        }
    }
    match matches.len() {
        0 => Resolved::None,
        1 => Resolved::One(matches.remove(0)),
        _ => {
            matches.sort();
            Resolved::Ambiguous(matches)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, new_id());
    }

    #[test]
    fn prefixes_resolve() {
        let ids = vec!["abc1".to_string(), "abd2".to_string(), "ab".to_string()];
        assert_eq!(resolve("abc", &ids), Resolved::One("abc1".into()));
        assert_eq!(resolve("ab", &ids), Resolved::One("ab".into()));
        assert_eq!(
            resolve("a", &ids),
            Resolved::Ambiguous(vec!["ab".into(), "abc1".into(), "abd2".into()])
        );
        assert_eq!(resolve("x", &ids), Resolved::None);
        assert_eq!(resolve("", &ids), Resolved::None);
    }
}
