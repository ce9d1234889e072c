//! A minimal RateLimitService client, for the engine's tests and for poking a running
//! engine (or a real Limitador, or envoyproxy/ratelimit) by hand.

use std::net::SocketAddr;

use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::proto::{RateLimitRequest, RateLimitResponse, SHOULD_RATE_LIMIT_PATH};

/// One HTTP/2 connection to a rate limit service.
#[derive(Clone)]
pub struct RlsClient {
    grpc: Grpc<Channel>,
}

/// Connecting failed (bad address or nothing listening).
pub type ConnectError = Box<dyn std::error::Error + Send + Sync>;

impl RlsClient {
    /// Connects to the service at `addr` (plain-text HTTP/2).
    pub async fn connect(addr: SocketAddr) -> Result<Self, ConnectError> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(RlsClient {
            grpc: Grpc::new(channel),
        })
    }

    /// Calls `ShouldRateLimit`.
    pub async fn should_rate_limit(
        &mut self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, Status> {
        self.call(SHOULD_RATE_LIMIT_PATH, request).await
    }

    /// Sends `request` to the method at gRPC `path` (`/package.Service/Method`).
    pub async fn call(
        &mut self,
        path: &'static str,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::default();
        self.grpc
            .unary(
                Request::new(request),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map(tonic::Response::into_inner)
    }
}
