//! Text helpers every floor may use; pure, no IO.

/// `text` cut to at most `max_bytes`, on a character boundary so the result
/// is still valid UTF-8 (a header, a column or a log line never gets half a
/// character).
pub fn truncate_utf8(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_never_splits_a_character() {
        assert_eq!(truncate_utf8("abc", 5), "abc");
        assert_eq!(truncate_utf8("abcdef", 3), "abc");
        // "é" is two bytes: three bytes hold one of them, not one and a half.
        assert_eq!(truncate_utf8("éé", 3), "é");
    }
}
