//! The gRPC face of the engine, written against tonic's server building blocks instead of
//! `tonic-build` output. A [`RateLimitService`] is a `tower::Service` over HTTP requests
//! that routes, through `tonic::server::Grpc::unary` (prost codec from `tonic-prost`),
//! `/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` to [`rls`] and
//! `/kuadrant.service.ratelimit.v1.RateLimitService/Reserve` and `…/Commit` to
//! [`reserve`] — the paths limitador-server serves on its one gRPC port — and answers any
//! other path `UNIMPLEMENTED`, as generated servers do.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::proto::{
    Code, CommitRequest, CommitResponse, RateLimitRequest, RateLimitResponse, ReserveRequest,
    ReserveResponse, COMMIT_PATH, RESERVE_PATH, SERVICE_NAME, SHOULD_RATE_LIMIT_PATH,
};
use crate::reserve;
use crate::rls::{self, Limiter, RateLimitHeaders};

/// Everything a call needs, shared by all connections.
struct Shared {
    limiter: Limiter,
    headers: RateLimitHeaders,
    /// Log one line per call (counts and verdicts only, never descriptor values).
    verbose: bool,
}

/// The RateLimitService, ready for `tonic::transport::Server::add_service`.
#[derive(Clone)]
pub struct RateLimitService {
    shared: Arc<Shared>,
}

impl RateLimitService {
    pub fn new(limiter: Limiter, headers: RateLimitHeaders, verbose: bool) -> Self {
        RateLimitService {
            shared: Arc::new(Shared {
                limiter,
                headers,
                verbose,
            }),
        }
    }
}

impl NamedService for RateLimitService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for RateLimitService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        match request.uri().path() {
            SHOULD_RATE_LIMIT_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(ShouldRateLimit(shared), request).await)
            }),
            RESERVE_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Reserve(shared), request).await)
            }),
            COMMIT_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Commit(shared), request).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http::<Body>()) }),
        }
    }
}

/// Limitador's `Reserve`, as a tonic unary service.
struct Reserve(Arc<Shared>);

impl UnaryService<ReserveRequest> for Reserve {
    type Response = ReserveResponse;
    type Future = BoxFuture<Response<ReserveResponse>, Status>;

    fn call(&mut self, request: Request<ReserveRequest>) -> Self::Future {
        let shared = Arc::clone(&self.0);
        Box::pin(async move {
            let request = request.into_inner();
            match crate::in_time(reserve::reserve(&shared.limiter, &request)).await {
                Ok(answer) => {
                    if shared.verbose {
                        let code =
                            Code::try_from(answer.response.code).map_or("?", |c| c.as_str_name());
                        eprintln!(
                            "rls-engine: Reserve domain {:?}, {} descriptor(s), amount {}: \
                             {} counter(s), {code}, held {}",
                            request.domain,
                            request.descriptors.len(),
                            request.amount,
                            answer.counters,
                            answer.held,
                        );
                    }
                    Ok(Response::new(answer.response))
                }
                Err(status) => {
                    eprintln!("rls-engine: answering UNAVAILABLE: {}", status.message());
                    Err(status)
                }
            }
        })
    }
}

/// Limitador's `Commit`, as a tonic unary service.
struct Commit(Arc<Shared>);

impl UnaryService<CommitRequest> for Commit {
    type Response = CommitResponse;
    type Future = BoxFuture<Response<CommitResponse>, Status>;

    fn call(&mut self, request: Request<CommitRequest>) -> Self::Future {
        let shared = Arc::clone(&self.0);
        Box::pin(async move {
            let request = request.into_inner();
            match crate::in_time(reserve::commit(&shared.limiter, &request)).await {
                Ok(answer) => {
                    if shared.verbose {
                        eprintln!(
                            "rls-engine: Commit domain {:?}, {} descriptor(s), actual {}, \
                             released {}",
                            request.domain,
                            request.descriptors.len(),
                            request.actual_amount,
                            answer.reservation_released,
                        );
                    }
                    Ok(Response::new(answer))
                }
                Err(status) => {
                    eprintln!("rls-engine: answering UNAVAILABLE: {}", status.message());
                    Err(status)
                }
            }
        })
    }
}

/// The one method, as a tonic unary service.
struct ShouldRateLimit(Arc<Shared>);

impl UnaryService<RateLimitRequest> for ShouldRateLimit {
    type Response = RateLimitResponse;
    type Future = BoxFuture<Response<RateLimitResponse>, Status>;

    fn call(&mut self, request: Request<RateLimitRequest>) -> Self::Future {
        let shared = Arc::clone(&self.0);
        Box::pin(async move {
            let request = request.into_inner();
            match crate::in_time(rls::should_rate_limit(
                &shared.limiter,
                shared.headers,
                &request,
            ))
            .await
            {
                Ok(answer) => {
                    if shared.verbose {
                        let code = Code::try_from(answer.response.overall_code)
                            .map_or("?", |c| c.as_str_name());
                        eprintln!(
                            "rls-engine: domain {:?}, {} descriptor(s), hits {}: {} counter(s), {code}{}",
                            request.domain,
                            request.descriptors.len(),
                            answer.hits,
                            answer.counters,
                            answer
                                .limit_name
                                .map(|n| format!(" (limit {n:?})"))
                                .unwrap_or_default(),
                        );
                    }
                    Ok(Response::new(answer.response))
                }
                Err(status) => {
                    eprintln!("rls-engine: answering UNAVAILABLE: {}", status.message());
                    Err(status)
                }
            }
        })
    }
}
