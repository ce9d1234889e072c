//! The messages of Envoy's rate limit service API and of Limitador's reservation methods,
//! derived by hand with `prost` so the build needs no `protoc`:
//! `envoy.service.ratelimit.v3.RateLimitRequest` /
//! `RateLimitResponse` (api/envoy/service/ratelimit/v3/rls.proto),
//! `kuadrant.service.ratelimit.v1.{Reserve,Commit}{Request,Response}`
//! (Kuadrant/limitador `limitador-server/proto/kuadrantrls.proto`),
//! `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`
//! (api/envoy/extensions/common/ratelimit/v3/ratelimit.proto) and the two small messages
//! they embed, `envoy.config.core.v3.HeaderValue` and `google.protobuf.Duration`.
//!
//! Field numbers and wire types are those of the `.proto` files; a field left out here
//! is skipped on decoding, as protobuf skips any unknown field. Left out:
//! `RateLimitResponse.dynamic_metadata` (6) and `quota` (7), `DescriptorStatus.quota`
//! (5), which Limitador never sets, and anything newer Envoy versions add to the
//! descriptor. Enum fields are kept as `i32`, as on the wire; [`Code`] and [`Unit`] give
//! the values names.

/// The request the proxy sends: `envoy.service.ratelimit.v3.RateLimitRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    /// The domain; Limitador reads it as the limits' namespace.
    #[prost(string, tag = "1")]
    pub domain: String,
    /// The descriptors; every one of them is checked, and the request is over the limit
    /// when any one is.
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// How much the request adds to every matched counter; 0 (unset) means 1.
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// One descriptor: `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitDescriptor {
    /// The ordered `(key, value)` entries.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    /// A limit the proxy asks for instead of the configured one (Limitador ignores it).
    #[prost(message, optional, tag = "2")]
    pub limit: Option<RateLimitOverride>,
}

/// `RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `RateLimitDescriptor.RateLimitOverride`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// `envoy.type.v3.RateLimitUnit`, same numbering as [`Unit`].
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

/// The answer: `envoy.service.ratelimit.v3.RateLimitResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    /// A [`Code`]: the verdict over all descriptors.
    #[prost(enumeration = "Code", tag = "1")]
    pub overall_code: i32,
    /// One status per request descriptor, in order (Limitador leaves this empty).
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
    /// Headers for the proxy to add to the downstream response.
    #[prost(message, repeated, tag = "3")]
    pub response_headers_to_add: Vec<HeaderValue>,
    /// Headers for the proxy to add to the upstream request.
    #[prost(message, repeated, tag = "4")]
    pub request_headers_to_add: Vec<HeaderValue>,
    /// A body for the proxy's over-limit reply.
    #[prost(bytes = "vec", tag = "5")]
    pub raw_body: Vec<u8>,
}

/// `RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    /// A [`Code`].
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

/// `RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// A [`Unit`].
    #[prost(enumeration = "Unit", tag = "2")]
    pub unit: i32,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    /// The service could not decide (Envoy lets the request through).
    Unknown = 0,
    Ok = 1,
    OverLimit = 2,
}

impl Code {
    /// The name as in the `.proto` file.
    pub fn as_str_name(self) -> &'static str {
        match self {
            Code::Unknown => "UNKNOWN",
            Code::Ok => "OK",
            Code::OverLimit => "OVER_LIMIT",
        }
    }
}

/// `RateLimitResponse.RateLimit.Unit` (and `envoy.type.v3.RateLimitUnit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Unit {
    Unknown = 0,
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
}

/// The gRPC service name, as in `/envoy.service.ratelimit.v3.RateLimitService/…`.
pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// The path of the one method, `ShouldRateLimit`.
pub const SHOULD_RATE_LIMIT_PATH: &str =
    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// `kuadrant.service.ratelimit.v1.ReserveRequest` (limitador-server
/// `proto/kuadrantrls.proto`, Limitador 0.14): hold `amount` on every counter the
/// descriptors match, for at most `ttl`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReserveRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint64, tag = "3")]
    pub amount: u64,
    /// Unset: the server's ceiling; set: clamped to it.
    #[prost(message, optional, tag = "4")]
    pub ttl: Option<Duration>,
}

/// `kuadrant.service.ratelimit.v1.ReserveResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReserveResponse {
    /// A [`Code`].
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    /// Set only on `OK` (and empty when nothing was held): passed back to `Commit`.
    #[prost(string, tag = "2")]
    pub reservation_id: String,
}

/// `kuadrant.service.ratelimit.v1.CommitRequest`: charge `actual_amount`, release the
/// hold `reservation_id` if it is still live.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(string, tag = "3")]
    pub reservation_id: String,
    #[prost(uint64, tag = "4")]
    pub actual_amount: u64,
}

/// `kuadrant.service.ratelimit.v1.CommitResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitResponse {
    #[prost(bool, tag = "1")]
    pub reservation_released: bool,
}

/// Limitador's own gRPC service, beside Envoy's on the same port.
pub const KUADRANT_SERVICE_NAME: &str = "kuadrant.service.ratelimit.v1.RateLimitService";

/// The path of `Reserve`.
pub const RESERVE_PATH: &str = "/kuadrant.service.ratelimit.v1.RateLimitService/Reserve";

/// The path of `Commit`.
pub const COMMIT_PATH: &str = "/kuadrant.service.ratelimit.v1.RateLimitService/Commit";

impl RateLimitDescriptor {
    /// A descriptor of `(key, value)` entries, in order, without a limit override.
    pub fn of(entries: &[(&str, &str)]) -> Self {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(key, value)| Entry {
                    key: (*key).to_string(),
                    value: (*value).to_string(),
                })
                .collect(),
            limit: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    // Expected bytes written out from the protobuf encoding rules (tag = field << 3 |
    // wire type), so a wrong field number or type fails here, not in Envoy.
    #[test]
    fn request_fields_have_envoys_numbers_and_wire_types() {
        let request = RateLimitRequest {
            domain: "tf".into(),
            descriptors: vec![RateLimitDescriptor::of(&[("budget", "d")])],
            hits_addend: 300,
        };
        let bytes = request.encode_to_vec();
        let expected: Vec<u8> = vec![
            0x0a, 2, b't', b'f', // 1: domain, length-delimited
            0x12, 13, // 2: descriptors, length-delimited, 13 bytes
            0x0a, 11, // descriptor 1: entries, 11 bytes
            0x0a, 6, b'b', b'u', b'd', b'g', b'e', b't', // entry 1: key
            0x12, 1, b'd', // entry 2: value
            0x18, 0xac, 0x02, // 3: hits_addend, varint 300
        ];
        assert_eq!(bytes, expected);
        assert_eq!(RateLimitRequest::decode(bytes.as_slice()).unwrap(), request);
    }

    #[test]
    fn response_fields_have_envoys_numbers_and_wire_types() {
        let response = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: Some(RateLimit {
                    name: "n".into(),
                    requests_per_unit: 5,
                    unit: Unit::Day as i32,
                }),
                limit_remaining: 4,
                duration_until_reset: Some(Duration {
                    seconds: 7,
                    nanos: 0,
                }),
            }],
            response_headers_to_add: vec![HeaderValue {
                key: "k".into(),
                value: "v".into(),
                raw_value: Vec::new(),
            }],
            request_headers_to_add: Vec::new(),
            raw_body: b"x".to_vec(),
        };
        let bytes = response.encode_to_vec();
        let expected: Vec<u8> = vec![
            0x08, 2, // 1: overall_code OVER_LIMIT
            0x12, 17, // 2: statuses, 17 bytes
            0x08, 1, // status 1: code OK
            0x12, 7, // status 2: current_limit, 7 bytes
            0x08, 5, // requests_per_unit (field 1)
            0x10, 4, // unit DAY (field 2)
            0x1a, 1, b'n', // name (field 3)
            0x18, 4, // status 3: limit_remaining
            0x22, 2, 0x08, 7, // status 4: duration_until_reset { seconds: 7 }
            0x1a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', // 3: response_headers_to_add
            0x2a, 1, b'x', // 5: raw_body
        ];
        assert_eq!(bytes, expected);
        assert_eq!(
            RateLimitResponse::decode(bytes.as_slice()).unwrap(),
            response
        );
    }

    #[test]
    fn reservation_messages_have_limitadors_numbers_and_wire_types() {
        let reserve = ReserveRequest {
            domain: "tf".into(),
            descriptors: vec![RateLimitDescriptor::of(&[("k", "v")])],
            amount: 500,
            ttl: Some(Duration {
                seconds: 60,
                nanos: 0,
            }),
        };
        let expected: Vec<u8> = vec![
            0x0a, 2, b't', b'f', // 1: domain
            0x12, 8, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', // 2: descriptors
            0x18, 0xf4, 0x03, // 3: amount, varint 500
            0x22, 2, 0x08, 60, // 4: ttl { seconds: 60 }
        ];
        assert_eq!(reserve.encode_to_vec(), expected);
        let answer = ReserveResponse {
            code: Code::Ok as i32,
            reservation_id: "id".into(),
        };
        assert_eq!(answer.encode_to_vec(), vec![0x08, 1, 0x12, 2, b'i', b'd']);
        let commit = CommitRequest {
            domain: "tf".into(),
            descriptors: Vec::new(),
            reservation_id: "id".into(),
            actual_amount: 100,
        };
        assert_eq!(
            commit.encode_to_vec(),
            vec![0x0a, 2, b't', b'f', 0x1a, 2, b'i', b'd', 0x20, 100]
        );
        let released = CommitResponse {
            reservation_released: true,
        };
        assert_eq!(released.encode_to_vec(), vec![0x08, 1]);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // A descriptor with a field this file does not model (number 9, varint).
        let mut bytes = RateLimitDescriptor::of(&[("k", "v")]).encode_to_vec();
        bytes.extend_from_slice(&[0x48, 1]);
        let decoded = RateLimitDescriptor::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, RateLimitDescriptor::of(&[("k", "v")]));
    }
}
