//! The gRPC face of the engine: `envoy.service.ratelimit.v3.RateLimitService`, written
//! against tonic's server building blocks instead of `tonic-build` output. A
//! [`RateLimitService`] is a `tower::Service` over HTTP requests that routes
//! `/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` through
//! `tonic::server::Grpc::unary` (prost codec from `tonic-prost`) to [`rls`], and answers
//! any other path `UNIMPLEMENTED`, as generated servers do.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::proto::{
    Code, RateLimitRequest, RateLimitResponse, SERVICE_NAME, SHOULD_RATE_LIMIT_PATH,
};
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
        if request.uri().path() != SHOULD_RATE_LIMIT_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http::<Body>()) });
        }
        let method = ShouldRateLimit(Arc::clone(&self.shared));
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(method, request).await)
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
            match rls::should_rate_limit(&shared.limiter, shared.headers, &request).await {
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
