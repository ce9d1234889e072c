//! Limitador's reservation protocol (`kuadrant.service.ratelimit.v1.RateLimitService`,
//! methods `Reserve` and `Commit`), the little of it a global budget needs, encoded and
//! decoded by hand like [`crate::global::rls`].
//!
//! limitador-server serves it beside Envoy's `ShouldRateLimit` since Limitador 0.14
//! (Kuadrant/limitador PR #515, `limitador-server/proto/kuadrantrls.proto`):
//!
//! - `Reserve(ReserveRequest { domain = 1, descriptors = 2, uint64 amount = 3,
//!   google.protobuf.Duration ttl = 4 })` checks every matching counter's value *plus the
//!   holds outstanding on it* plus `amount` against the limit and records the new hold, in
//!   one Redis script: concurrent reservations cannot overshoot. It answers
//!   `ReserveResponse { Code code = 1; string reservation_id = 2; }`; the id is set only
//!   on `OK`, and is empty when nothing was held (no limit applies).
//! - `Commit(CommitRequest { domain = 1, descriptors = 2, string reservation_id = 3,
//!   uint64 actual_amount = 4 })` always adds `actual_amount` to the matching counters
//!   and releases the hold if it is still live: a cost below the reservation gives the
//!   rest back. An empty or expired id is a plain charge. It answers
//!   `CommitResponse { bool reservation_released = 1; }`.
//!
//! A hold the caller never commits expires after `ttl` (limitador-server clamps it to its
//! own ceiling, 60 s by default). The answers carry no remaining quota (an open proposal,
//! PR #517, would add response headers), so global budgets on this protocol have no
//! `x-ratelimit-*` figures from the service.
//!
//! Everything decoded here comes from the network: a malformed answer is an error for the
//! caller's failure mode, never a panic, and a reservation id is kept only when it is short
//! UTF-8 text (Limitador's are UUIDs).

use super::rls::{put_bytes, put_descriptors, put_varint_field, Code, DecodeError, Reader, Value};

/// The gRPC service and its two methods.
pub const SERVICE: &str = "kuadrant.service.ratelimit.v1.RateLimitService";
pub const RESERVE: &str = "Reserve";
pub const COMMIT: &str = "Commit";

/// Longest reservation id accepted from the service, in bytes (a UUID is 36).
pub const MAX_RESERVATION_ID: usize = 128;

/// `ReserveRequest`: hold `amount` on every counter the descriptors match, for `ttl_secs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveRequest<'a> {
    pub domain: &'a str,
    pub descriptors: Vec<Vec<(&'a str, &'a str)>>,
    pub amount: u64,
    pub ttl_secs: u64,
}

impl ReserveRequest<'_> {
    /// The protobuf encoding of the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80);
        put_bytes(&mut out, 1, self.domain.as_bytes());
        put_descriptors(&mut out, 2, &self.descriptors);
        if self.amount > 0 {
            put_varint_field(&mut out, 3, self.amount);
        }
        // google.protobuf.Duration { int64 seconds = 1; }. Left out at 0: no ttl asked
        // for is the server's ceiling, a zero one would expire at once.
        if self.ttl_secs > 0 {
            let mut ttl = Vec::with_capacity(6);
            put_varint_field(&mut ttl, 1, self.ttl_secs);
            put_bytes(&mut out, 4, &ttl);
        }
        out
    }
}

/// `CommitRequest`: charge `actual_amount` and release reservation `reservation_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRequest<'a> {
    pub domain: &'a str,
    pub descriptors: Vec<Vec<(&'a str, &'a str)>>,
    pub reservation_id: &'a str,
    pub actual_amount: u64,
}

impl CommitRequest<'_> {
    /// The protobuf encoding of the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        put_bytes(&mut out, 1, self.domain.as_bytes());
        put_descriptors(&mut out, 2, &self.descriptors);
        if !self.reservation_id.is_empty() {
            put_bytes(&mut out, 3, self.reservation_id.as_bytes());
        }
        if self.actual_amount > 0 {
            put_varint_field(&mut out, 4, self.actual_amount);
        }
        out
    }
}

/// The decoded `ReserveResponse`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveResponse {
    pub code: Code,
    /// Empty when the service holds nothing (no limit applies) or refused.
    pub reservation_id: String,
}

impl ReserveResponse {
    /// Decode a `ReserveResponse`. Unknown fields are skipped; a reservation id that is
    /// not UTF-8 or longer than [`MAX_RESERVATION_ID`] makes the answer malformed.
    pub fn decode(bytes: &[u8]) -> Result<ReserveResponse, DecodeError> {
        let mut response = ReserveResponse {
            code: Code::Unknown,
            reservation_id: String::new(),
        };
        let mut r = Reader::new(bytes);
        while let Some((field, value)) = r.next_field()? {
            match (field, value) {
                (1, Value::Varint(v)) => response.code = Code::from_wire(v),
                (2, Value::Bytes(b)) => {
                    if b.len() > MAX_RESERVATION_ID {
                        return Err(DecodeError("reservation id too long"));
                    }
                    let id = std::str::from_utf8(b)
                        .map_err(|_| DecodeError("reservation id not UTF-8"))?;
                    response.reservation_id = id.to_string();
                }
                _ => {}
            }
        }
        if response.code != Code::Ok {
            // Only an admission holds anything; an id beside a refusal means nothing.
            response.reservation_id.clear();
        }
        Ok(response)
    }
}

/// Decode a `CommitResponse`: whether a live hold was released (false when it had expired
/// or there was none: the amount was charged either way).
pub fn decode_commit_response(bytes: &[u8]) -> Result<bool, DecodeError> {
    let mut released = false;
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        if let (1, Value::Varint(v)) = (field, value) {
            released = v != 0;
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor_bytes() -> Vec<u8> {
        // descriptors (2, {entries (1, {1:"budget",2:"d"}), entries (1, {1:"key",2:"a"})})
        let entry1 = [&[0x0a, 6][..], b"budget", &[0x12, 1], b"d"].concat();
        let entry2 = [&[0x0a, 3][..], b"key", &[0x12, 1], b"a"].concat();
        let d = [
            &[0x0a, entry1.len() as u8][..],
            &entry1,
            &[0x0a, entry2.len() as u8],
            &entry2,
        ]
        .concat();
        [&[0x12, d.len() as u8][..], &d].concat()
    }

    #[test]
    fn reserve_request_encodes_domain_descriptor_amount_and_ttl() {
        let bytes = ReserveRequest {
            domain: "tf",
            descriptors: vec![vec![("budget", "d"), ("key", "a")]],
            amount: 500,
            ttl_secs: 60,
        }
        .encode();
        let expected = [
            &[0x0a, 2][..],
            b"tf",
            &descriptor_bytes(),
            &[0x18, 0xf4, 0x03],  // 3: amount 500
            &[0x22, 2, 0x08, 60], // 4: ttl { seconds: 60 }
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn commit_request_encodes_the_id_and_the_actual_amount() {
        let bytes = CommitRequest {
            domain: "tf",
            descriptors: vec![vec![("budget", "d"), ("key", "a")]],
            reservation_id: "r1",
            actual_amount: 100,
        }
        .encode();
        let expected = [
            &[0x0a, 2][..],
            b"tf",
            &descriptor_bytes(),
            &[0x1a, 2],
            b"r1",
            &[0x20, 100],
        ]
        .concat();
        assert_eq!(bytes, expected);
        // A refund to nothing leaves both out (proto3 defaults): an empty id commits as a
        // plain charge of 0.
        let refund = CommitRequest {
            domain: "tf",
            descriptors: vec![],
            reservation_id: "",
            actual_amount: 0,
        }
        .encode();
        assert_eq!(refund, [&[0x0a, 2][..], b"tf"].concat());
    }

    #[test]
    fn reserve_responses_decode_code_and_id() {
        let ok = [&[0x08, 1, 0x12, 4][..], b"abcd"].concat();
        assert_eq!(
            ReserveResponse::decode(&ok).unwrap(),
            ReserveResponse {
                code: Code::Ok,
                reservation_id: "abcd".into()
            }
        );
        // OK without an id: nothing held (no limit applies).
        assert_eq!(
            ReserveResponse::decode(&[0x08, 1]).unwrap().reservation_id,
            ""
        );
        // An id beside OVER_LIMIT is dropped.
        let over = [&[0x08, 2, 0x12, 1][..], b"x"].concat();
        let r = ReserveResponse::decode(&over).unwrap();
        assert_eq!((r.code, r.reservation_id.as_str()), (Code::OverLimit, ""));
        assert_eq!(ReserveResponse::decode(&[]).unwrap().code, Code::Unknown);
        assert_eq!(
            ReserveResponse::decode(&[0x08, 9]).unwrap().code,
            Code::Unknown
        );
    }

    #[test]
    fn hostile_reservation_ids_are_malformed_answers() {
        let long = [&[0x08, 1, 0x12, 129, 1][..], &[b'a'; 129]].concat();
        assert!(ReserveResponse::decode(&long).is_err());
        let max = [&[0x08, 1, 0x12, 128, 1][..], &[b'a'; 128]].concat();
        assert_eq!(
            ReserveResponse::decode(&max).unwrap().reservation_id.len(),
            128
        );
        assert!(ReserveResponse::decode(&[0x08, 1, 0x12, 2, 0xff, 0xfe]).is_err());
        for bad in [&[0x12][..], &[0x12, 5, b'a'], &[0x08], &[0x0b]] {
            assert!(ReserveResponse::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_prefix_of_a_reserve_response_decodes_or_errors() {
        let bytes = [&[0x08, 1, 0x12, 36][..], &[b'7'; 36], &[0x38, 0x96, 0x01]].concat();
        for n in 0..=bytes.len() {
            let _ = ReserveResponse::decode(&bytes[..n]);
        }
        assert_eq!(
            ReserveResponse::decode(&bytes)
                .unwrap()
                .reservation_id
                .len(),
            36
        );
    }

    #[test]
    fn commit_responses_decode_the_release_flag() {
        assert!(decode_commit_response(&[0x08, 1]).unwrap());
        assert!(!decode_commit_response(&[]).unwrap());
        assert!(!decode_commit_response(&[0x32, 1, 0]).unwrap());
        assert!(decode_commit_response(&[0x08]).is_err());
    }
}
