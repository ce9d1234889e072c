//! Envoy's rate limit service protocol (`envoy.service.ratelimit.v3.RateLimitService`), the
//! little of it a global budget needs, encoded and decoded by hand.
//!
//! A global budget asks `ShouldRateLimit` with one descriptor, `budget=<name>, key=<identity>`,
//! and `hits_addend` set to what the request reserves; the engine (envoyproxy/ratelimit,
//! Limitador) owns the limit and the window and answers `OK` or `OVER_LIMIT`. Only the fields
//! used are encoded, and the response decoder reads `overall_code` and the per-descriptor
//! statuses and skips everything else, so newer engines with more fields still decode.
//! A malformed response is an error, never a panic: the caller applies its failure mode.
//!
//! Field numbers are those of `envoy/service/ratelimit/v3/rls.proto` and
//! `envoy/extensions/common/ratelimit/v3/ratelimit.proto`.

/// The gRPC service and method a global budget calls.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// One `ShouldRateLimit` request: a domain, descriptors of (key, value) entries, and the hits
/// to add to every matching limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitRequest<'a> {
    pub domain: &'a str,
    pub descriptors: Vec<Vec<(&'a str, &'a str)>>,
    pub hits_addend: u32,
}

impl RateLimitRequest<'_> {
    /// The protobuf encoding of the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        put_bytes(&mut out, 1, self.domain.as_bytes());
        put_descriptors(&mut out, 2, &self.descriptors);
        if self.hits_addend > 0 {
            put_varint_field(&mut out, 3, u64::from(self.hits_addend));
        }
        out
    }
}

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    pub(super) fn from_wire(v: u64) -> Code {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// What one descriptor's limit says, when the engine reports it (envoyproxy/ratelimit
/// does; Limitador leaves the statuses out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorStatus {
    pub code: Option<Code>,
    /// `current_limit.requests_per_unit`, if a limit matched.
    pub limit: Option<u32>,
    pub remaining: u32,
    /// `duration_until_reset`, whole seconds.
    pub reset_secs: Option<u64>,
}

/// The decoded response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitResponse {
    pub overall_code: Code,
    pub statuses: Vec<DescriptorStatus>,
}

/// Why a response could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed RateLimitResponse: {}", self.0)
    }
}

impl RateLimitResponse {
    /// Decode a `RateLimitResponse`.
    pub fn decode(bytes: &[u8]) -> Result<RateLimitResponse, DecodeError> {
        let mut response = RateLimitResponse {
            overall_code: Code::Unknown,
            statuses: Vec::new(),
        };
        let mut r = Reader::new(bytes);
        while let Some((field, value)) = r.next_field()? {
            match (field, value) {
                (1, Value::Varint(v)) => response.overall_code = Code::from_wire(v),
                (2, Value::Bytes(b)) => response.statuses.push(decode_status(b)?),
                _ => {}
            }
        }
        Ok(response)
    }
}

fn decode_status(bytes: &[u8]) -> Result<DescriptorStatus, DecodeError> {
    let mut status = DescriptorStatus::default();
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Varint(v)) => status.code = Some(Code::from_wire(v)),
            // RateLimit { uint32 requests_per_unit = 1; Unit unit = 2; string name = 3; }
            (2, Value::Bytes(b)) => {
                let mut limit = Reader::new(b);
                status.limit = Some(0);
                while let Some((f, v)) = limit.next_field()? {
                    if let (1, Value::Varint(n)) = (f, v) {
                        status.limit = Some(u32::try_from(n).unwrap_or(u32::MAX));
                    }
                }
            }
            (3, Value::Varint(v)) => status.remaining = u32::try_from(v).unwrap_or(u32::MAX),
            // google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2; }
            (4, Value::Bytes(b)) => {
                let mut d = Reader::new(b);
                let mut secs = 0u64;
                while let Some((f, v)) = d.next_field()? {
                    if let (1, Value::Varint(n)) = (f, v) {
                        // A negative duration (two's complement varint) means "now".
                        secs = if (n as i64) < 0 { 0 } else { n };
                    }
                }
                status.reset_secs = Some(secs);
            }
            _ => {}
        }
    }
    Ok(status)
}

/// `descriptors` as repeated `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`
/// (field `field`), each `{ repeated Entry entries = 1; }` with `Entry { string key = 1;
/// string value = 2; }`.
pub(super) fn put_descriptors(out: &mut Vec<u8>, field: u32, descriptors: &[Vec<(&str, &str)>]) {
    for descriptor in descriptors {
        let mut d = Vec::with_capacity(48);
        for (key, value) in descriptor {
            let mut e = Vec::with_capacity(key.len().saturating_add(value.len()).saturating_add(4));
            put_bytes(&mut e, 1, key.as_bytes());
            put_bytes(&mut e, 2, value.as_bytes());
            put_bytes(&mut d, 1, &e);
        }
        put_bytes(out, field, &d);
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

pub(super) fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub(super) enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// A protobuf wire-format reader over a byte slice.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.bytes.get(self.at) else {
                return Err(DecodeError("truncated varint"));
            };
            // `at` indexes a byte just read: below the length, so the sum cannot saturate.
            self.at = self.at.saturating_add(1);
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let past_end = DecodeError("field runs past the end");
        let end = self.at.checked_add(n).ok_or(past_end)?;
        let slice = self.bytes.get(self.at..end).ok_or(past_end)?;
        self.at = end;
        Ok(slice)
    }

    /// The next (field number, value), or `None` at the end.
    pub(super) fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, DecodeError> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let field = tag >> 3;
        if field == 0 {
            return Err(DecodeError("field number 0"));
        }
        let value = match tag & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len =
                    usize::try_from(self.varint()?).map_err(|_| DecodeError("length overflows"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            _ => return Err(DecodeError("unsupported wire type")),
        };
        Ok(Some((field, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encodes_domain_descriptor_entries_and_hits() {
        let req = RateLimitRequest {
            domain: "tf",
            descriptors: vec![vec![("budget", "d"), ("key", "acme")]],
            hits_addend: 300,
        };
        let bytes = req.encode();
        // Hand-assembled: domain (1, "tf"), descriptors (2, {entries (1, {1:"budget",2:"d"}),
        // entries (1, {1:"key",2:"acme"})}), hits_addend (3, 300 = ac 02).
        let entry1 = [&[0x0a, 6][..], b"budget", &[0x12, 1], b"d"].concat();
        let entry2 = [&[0x0a, 3][..], b"key", &[0x12, 4], b"acme"].concat();
        let descriptor = [
            &[0x0a, entry1.len() as u8][..],
            &entry1,
            &[0x0a, entry2.len() as u8],
            &entry2,
        ]
        .concat();
        let expected = [
            &[0x0a, 2][..],
            b"tf",
            &[0x12, descriptor.len() as u8],
            &descriptor,
            &[0x18, 0xac, 0x02],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn zero_hits_are_left_out_as_proto3_does() {
        let req = RateLimitRequest {
            domain: "d",
            descriptors: vec![],
            hits_addend: 0,
        };
        assert_eq!(req.encode(), vec![0x0a, 1, b'd']);
    }

    #[test]
    fn long_values_get_multi_byte_lengths() {
        let long = "x".repeat(300);
        let req = RateLimitRequest {
            domain: &long,
            descriptors: vec![],
            hits_addend: u32::MAX,
        };
        let bytes = req.encode();
        assert_eq!(&bytes[..3], &[0x0a, 0xac, 0x02]);
        assert_eq!(
            &bytes[bytes.len() - 6..],
            &[0x18, 0xff, 0xff, 0xff, 0xff, 0x0f]
        );
    }

    #[test]
    fn response_codes_decode() {
        assert_eq!(
            RateLimitResponse::decode(&[0x08, 1]).unwrap().overall_code,
            Code::Ok
        );
        assert_eq!(
            RateLimitResponse::decode(&[0x08, 2]).unwrap().overall_code,
            Code::OverLimit
        );
        // proto3 leaves a zero enum out: an empty message is UNKNOWN.
        assert_eq!(
            RateLimitResponse::decode(&[]).unwrap().overall_code,
            Code::Unknown
        );
    }

    #[test]
    fn statuses_decode_limit_remaining_and_reset() {
        // status { code: OVER_LIMIT, current_limit { requests_per_unit: 1000, unit: DAY },
        //          limit_remaining: 0, duration_until_reset { seconds: 3600 } }
        let limit = [0x08, 0xe8, 0x07, 0x10, 4];
        let reset = [0x08, 0x90, 0x1c];
        let status = [
            &[0x08, 2, 0x12, limit.len() as u8][..],
            &limit,
            &[0x18, 0, 0x22, reset.len() as u8],
            &reset,
        ]
        .concat();
        let bytes = [&[0x08, 2, 0x12, status.len() as u8][..], &status].concat();
        let r = RateLimitResponse::decode(&bytes).unwrap();
        assert_eq!(r.overall_code, Code::OverLimit);
        assert_eq!(
            r.statuses,
            vec![DescriptorStatus {
                code: Some(Code::OverLimit),
                limit: Some(1000),
                remaining: 0,
                reset_secs: Some(3600),
            }]
        );
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped() {
        let bytes = [
            0x08, 1, // overall_code OK
            0x21, 1, 2, 3, 4, 5, 6, 7, 8, // field 4, fixed64
            0x2d, 1, 2, 3, 4, // field 5, fixed32
            0x32, 2, b'h', b'i', // field 6, bytes
            0x38, 0x96, 0x01, // field 7, varint
        ];
        let r = RateLimitResponse::decode(&bytes).unwrap();
        assert_eq!(r.overall_code, Code::Ok);
        assert!(r.statuses.is_empty());
    }

    #[test]
    fn malformed_responses_are_errors_not_panics() {
        for bad in [
            &[0x08][..],   // varint cut
            &[0x12, 5, 1], // length past the end
            &[0x0b],       // group wire type
            &[0x00, 1],    // field 0
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            &[0x12, 2, 0x12, 9], // nested status runs past its end
            &[0x21, 1, 2],       // fixed64 cut
        ] {
            assert!(RateLimitResponse::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_response_decodes_or_errors() {
        let limit = [0x08, 0xe8, 0x07, 0x10, 4];
        let status = [&[0x08, 1, 0x12, limit.len() as u8][..], &limit, &[0x18, 7]].concat();
        let bytes = [&[0x08, 1, 0x12, status.len() as u8][..], &status].concat();
        for n in 0..=bytes.len() {
            let _ = RateLimitResponse::decode(&bytes[..n]);
        }
        assert_eq!(
            RateLimitResponse::decode(&bytes).unwrap().statuses[0].remaining,
            7
        );
    }
}
