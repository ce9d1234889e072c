//! The header-map wire format of the proxy-wasm ABI (`proxy_get_header_map_pairs`), read in
//! place: host-independent, so it is tested natively, but only the proxy side uses it.

/// A header map as proxy-wasm serialises it (`proxy_get_header_map_pairs`): a u32 count, a
/// (key length, value length) u32 pair per entry, then each key and value followed by a NUL
/// byte, little-endian. Kept as received; entries are located once and looked up in place,
/// so reading a map costs one allocation for the offsets, not two strings per header.
/// Writes made through the filter afterwards are recorded on top ([`HeaderPairs::set`]).
#[derive(Debug, Default)]
pub struct HeaderPairs {
    raw: Vec<u8>,
    /// Byte ranges of each key and value in `raw`, for the entries not overwritten since.
    spans: Vec<[u32; 4]>,
    /// Values set since the map was read, in order.
    added: Vec<(String, String)>,
}

impl HeaderPairs {
    /// Locate the entries of `raw`. `None` when the bytes do not add up.
    pub fn parse(raw: Vec<u8>) -> Option<HeaderPairs> {
        if raw.is_empty() {
            return Some(HeaderPairs::default());
        }
        let word = |at: usize| -> Option<usize> {
            let b = raw.get(at..at.checked_add(4)?)?;
            Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
        };
        let count = word(0)?;
        let mut data = count.checked_mul(8)?.checked_add(4)?;
        if data > raw.len() {
            return None;
        }
        let mut spans = Vec::with_capacity(count);
        for i in 0..count {
            let sizes = i.checked_mul(8)?;
            let key_len = word(sizes.checked_add(4)?)?;
            let value_len = word(sizes.checked_add(8)?)?;
            let key_end = data.checked_add(key_len)?;
            let value_start = key_end.checked_add(1)?;
            let value_end = value_start.checked_add(value_len)?;
            if raw.get(key_end) != Some(&0) || raw.get(value_end) != Some(&0) {
                return None;
            }
            // Every offset is below raw.len(), which the host's u32 sizes bound.
            let at = |n: usize| u32::try_from(n).ok();
            spans.push([at(data)?, at(key_end)?, at(value_start)?, at(value_end)?]);
            data = value_end.checked_add(1)?;
        }
        Some(HeaderPairs {
            raw,
            spans,
            added: Vec::new(),
        })
    }

    fn bytes(&self, from: u32, to: u32) -> &[u8] {
        self.raw.get(from as usize..to as usize).unwrap_or_default()
    }

    /// The first value of `name` (case-insensitive), decoded lossily: clients send any
    /// bytes in headers.
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some((_, v)) = self
            .added
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            return Some(v.clone());
        }
        self.spans
            .iter()
            .find(|s| self.bytes(s[0], s[1]).eq_ignore_ascii_case(name.as_bytes()))
            .map(|s| String::from_utf8_lossy(self.bytes(s[2], s[3])).into_owned())
    }

    /// Whether `name` has a value.
    pub fn contains(&self, name: &str) -> bool {
        self.added.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
            || self
                .spans
                .iter()
                .any(|s| self.bytes(s[0], s[1]).eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Record that every value of `name` was replaced by `value` (or removed).
    pub fn set(&mut self, name: &str, value: Option<&str>) {
        let raw = &self.raw;
        self.spans.retain(|s| {
            !raw.get(s[0] as usize..s[1] as usize)
                .unwrap_or_default()
                .eq_ignore_ascii_case(name.as_bytes())
        });
        self.added.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            self.added.push((name.to_ascii_lowercase(), v.to_string()));
        }
    }

    /// Every entry, in order (the map as read, then what was set since).
    pub fn pairs(&self) -> Vec<(String, String)> {
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        self.spans
            .iter()
            .map(|s| (lossy(self.bytes(s[0], s[1])), lossy(self.bytes(s[2], s[3]))))
            .chain(self.added.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod map_tests {
    use super::HeaderPairs;

    fn parse_map_pairs(bytes: &[u8]) -> Option<Vec<(String, String)>> {
        HeaderPairs::parse(bytes.to_vec()).map(|m| m.pairs())
    }

    fn encode(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn header_pairs_decode_in_order_with_lossy_values() {
        let bytes = encode(&[
            (":path", b"/v1/chat"),
            ("x-tenant", b"acme"),
            ("x-bin", b"\xff"),
        ]);
        assert_eq!(
            parse_map_pairs(&bytes).unwrap(),
            vec![
                (":path".to_string(), "/v1/chat".to_string()),
                ("x-tenant".to_string(), "acme".to_string()),
                ("x-bin".to_string(), "\u{fffd}".to_string()),
            ]
        );
        assert_eq!(parse_map_pairs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn lookups_are_case_insensitive_and_writes_replace_every_value() {
        let bytes = encode(&[
            (":status", b"200"),
            ("x-a", b"1"),
            ("x-a", b"2"),
            ("content-type", b"application/json"),
        ]);
        let mut m = HeaderPairs::parse(bytes).unwrap();
        assert_eq!(m.get("X-A").as_deref(), Some("1"));
        assert!(m.contains("content-type"));
        assert!(!m.contains("content-encoding"));
        m.set("x-a", Some("3"));
        assert_eq!(m.get("x-a").as_deref(), Some("3"));
        m.set("Content-Type", None);
        assert_eq!(m.get("content-type"), None);
        m.set("x-new", Some("v"));
        assert_eq!(
            m.pairs(),
            vec![
                (":status".to_string(), "200".to_string()),
                ("x-a".to_string(), "3".to_string()),
                ("x-new".to_string(), "v".to_string()),
            ]
        );
    }

    #[test]
    fn truncated_or_lying_maps_are_refused_not_panicked_on() {
        let bytes = encode(&[("k", b"value")]);
        for n in 1..bytes.len() {
            assert!(parse_map_pairs(&bytes[..n]).is_none(), "prefix {n}");
        }
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_map_pairs(&huge).is_none());
        let mut long_key = bytes;
        long_key[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse_map_pairs(&long_key).is_none());
    }
}
