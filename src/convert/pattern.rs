//! Layer-name patterns: `*` matches any run of characters (dots included), everything else
//! matches itself. `"*.mlp.*"`, `"lm_head"`, `"model.layers.0.*"`.

/// Whether `name` matches the glob `pattern` as a whole.
pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches("lm_head", "lm_head"));
        assert!(!matches("lm_head", "model.lm_head"));
        assert!(matches("*lm_head", "model.lm_head"));
        assert!(matches("*.mlp.*", "model.layers.3.mlp.down_proj"));
        assert!(!matches("*.mlp.*", "model.layers.3.self_attn.q_proj"));
        assert!(matches("model.layers.*.q_proj", "model.layers.12.self_attn.q_proj"));
        assert!(matches("*", ""));
        assert!(!matches("a*a", "a"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxcyyb"));
    }
}
