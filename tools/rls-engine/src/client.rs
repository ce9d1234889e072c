//! A minimal RateLimitService client, for the engine's tests and for poking a running
//! engine (or a real Limitador, or envoyproxy/ratelimit) by hand.

use std::net::SocketAddr;

use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::proto::{
    CommitRequest, CommitResponse, RateLimitRequest, RateLimitResponse, ReserveRequest,
    ReserveResponse, COMMIT_PATH, RESERVE_PATH, SHOULD_RATE_LIMIT_PATH,
};

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

    /// Calls Limitador's `Reserve`.
    pub async fn reserve(&mut self, request: ReserveRequest) -> Result<ReserveResponse, Status> {
        self.unary(RESERVE_PATH, request).await
    }

    /// Calls Limitador's `Commit`.
    pub async fn commit(&mut self, request: CommitRequest) -> Result<CommitResponse, Status> {
        self.unary(COMMIT_PATH, request).await
    }

    /// Sends `request` to the method at gRPC `path` (`/package.Service/Method`).
    pub async fn call(
        &mut self,
        path: &'static str,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, Status> {
        self.unary(path, request).await
    }

    /// One unary call of any of the service's methods.
    async fn unary<Req, Resp>(&mut self, path: &'static str, request: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
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
