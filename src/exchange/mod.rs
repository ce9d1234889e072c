//! One HTTP stream through the filter, request to response.
//!
//! The callbacks below only dispatch; each phase lives in its own file and hands the next
//! one its input:
//!
//! - [`request`]: the headers say whether the stream is an LLM call (a POST to a known API
//!   path) and who is asking; the request is held until its body is complete (the plugin
//!   config must set `allow_on_headers_stop_iteration`), then the body is parsed and its
//!   prompt counted ([`request::Counted`]);
//! - [`admit`]: the local budgets (caps, truncation, the plan that reserves or reroutes),
//!   then the global ones ([`Admitted`], or a refusal);
//! - the body edits the admission asks for are applied once ([`crate::llm::rewrite`]);
//! - [`meter`]: the response is read as it passes, never delayed, into what the exchange
//!   is billed;
//! - [`settle`]: when the stream ends — completed, cut by the upstream, or abandoned by the
//!   client — the cost replaces the reservations, once; refusals refund on the same path.
//!
//! Every answer the filter gives a client goes through [`reply`]; admin requests are
//! [`admin`]'s.

pub mod admin;
mod admit;
mod cached;
mod meter;
pub mod reply;
mod request;
#[cfg(any(test, feature = "testkit"))]
pub mod scenario;
mod settle;

use std::rc::Rc;

use self::admin::AdminStep;
use self::admit::Refused;
use self::meter::{End, Meter};
use self::reply::{Asked, Decision, Refusal};
use self::request::{Identity, NotCounted, Pending};
use crate::budget::plan::{RateHeaders, Reservation};
use crate::budget::window::go_duration;
use crate::budget::Priority;
use crate::config::{MalformedPolicy, Protocol};
use crate::filter::Filter;
use crate::global;
use crate::host::{Host, Level};
use crate::llm::api::{ApiKind, RequestError};
use crate::llm::prompt::PromptCount;
use crate::llm::rewrite;
use crate::stats::{catalog, Stat};
use crate::tokenizer::ModelCounting;

pub use self::cached::{upkeep as cache_upkeep, CACHE_HEADER};
pub use self::reply::{PROMPT_TOKENS_HEADER, REROUTED_HEADER, WARNING_HEADER};

/// What a request waiting for an identical one became when the root tick looked again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Still waiting.
    Waiting,
    /// Answered, or handed on to a later callback: nothing for the glue to do.
    Done,
    /// Admitted to go upstream itself: the glue resumes the request.
    Resume,
}

/// What the glue tells Envoy after a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let the stream go on.
    Continue,
    /// Hold it (headers: until the body is complete; body: keep buffering).
    Pause,
}

/// One HTTP stream through the filter.
pub struct Exchange {
    filter: Rc<Filter>,
    id: u32,
    phase: Phase,
    /// Request body bytes buffered so far (for trailers, which end the body without a size).
    buffered: usize,
    /// The response cache's interest in this exchange's answer.
    caching: Option<cached::Caching>,
    /// What `x-tokenfuse-cache` says on the forwarded answer (`miss`, `refresh`, `bypass`).
    cache_status: Option<&'static str>,
}

/// A request waiting for the answer of an identical one in flight.
struct Waiting {
    pending: Box<Pending>,
    size: usize,
    key: crate::cache::Key,
    considered: cached::Considered,
    model: String,
    /// When it stops waiting and goes upstream itself.
    until_ms: i64,
}

enum Phase {
    /// Not an LLM call, or answered, or settled: the filter stays out of the way.
    Idle,
    /// An LLM call whose request body is still arriving.
    Body(Box<Pending>),
    /// Admitted by the local budgets, held while the rate limit service judges the global
    /// ones; the decision is counted once it admits.
    Checking {
        admitted: Box<Admitted>,
        decision: Option<Decision>,
        checks: Vec<global::Check>,
    },
    /// Forwarded; the response is being read.
    Forwarded(Box<Forwarded>),
    /// An admin top-up whose body is still arriving.
    AdminBody,
    /// Held until an identical request in flight answers (the root tick looks).
    Waiting(Box<Waiting>),
}

/// An admitted request, as it went upstream: what its response is metered against and
/// what settling it needs.
pub(crate) struct Admitted {
    kind: ApiKind,
    counting: ModelCounting,
    prompt: PromptCount,
    /// The model that serves (and bills) the request: the cheaper one when rerouted.
    served_model: String,
    /// Its `model` stat tag, under the cardinality cap.
    model_tag: String,
    rerouted: bool,
    priority: Priority,
    /// The `tenant` stat tag, when tenant tagging is on.
    tenant_tag: Option<String>,
    /// What the local budgets hold for it until it settles.
    reservations: Vec<Reservation>,
    /// What the rate limit service holds for it, per global budget.
    holds: Vec<global::Hold>,
    /// The tightest token budget, for the `x-ratelimit-*` headers.
    rate: Option<RateHeaders>,
    /// Budgets at or past their warning threshold.
    warnings: Vec<String>,
}

/// A forwarded request and its response so far.
struct Forwarded {
    admitted: Admitted,
    meter: Meter,
    /// The upstream cluster, once the response headers named it.
    cluster: Option<String>,
}

/// Count a decision: `tokenfuse_decisions.[tenant.]decision.[budget.]priority`.
fn count_decision(
    host: &mut dyn Host,
    admitted: &Admitted,
    decision: Decision,
    budget: Option<&str>,
) {
    decision_stat(
        host,
        admitted.tenant_tag.as_deref(),
        admitted.priority,
        decision,
        budget,
    );
}

fn decision_stat(
    host: &mut dyn Host,
    tenant: Option<&str>,
    priority: Priority,
    decision: Decision,
    budget: Option<&str>,
) {
    let mut stat = Stat::new(catalog::DECISIONS);
    if let Some(t) = tenant {
        stat = stat.tag("tenant", t);
    }
    stat = stat.tag("decision", decision.tag());
    if let Some(b) = budget {
        stat = stat.tag("budget", b);
    }
    host.counter_add(stat.tag("priority", priority.tag()).name(), 1);
}

impl Exchange {
    /// A new exchange for the HTTP context `id`.
    pub fn new(filter: Rc<Filter>, id: u32) -> Self {
        Exchange {
            filter,
            id,
            phase: Phase::Idle,
            buffered: 0,
            caching: None,
            cache_status: None,
        }
    }

    /// Request headers arrived.
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        match admin::on_request_headers(host, &self.filter.config, end_of_stream) {
            AdminStep::NotAdmin => {}
            AdminStep::Replied => return Action::Pause,
            AdminStep::AwaitBody => {
                self.phase = Phase::AdminBody;
                return Action::Pause;
            }
        }
        let config = &self.filter.config;
        // The reroute header is the filter's to set, on any request: a client must not pick
        // the economy route for itself (an LLM call would get the cheaper model's budget
        // treatment; any other request would reach the economy cluster).
        if host.request_header(&config.reroute.header).is_some() {
            host.set_request_header(&config.reroute.header, None);
        }
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        let kind = match ApiKind::from_path(&path) {
            Some(kind) if method.eq_ignore_ascii_case("POST") => kind,
            _ => {
                passthrough(host, "not_llm");
                return Action::Continue;
            }
        };
        if end_of_stream {
            return self.unreadable(host, kind, RequestError::Empty);
        }
        if let Some(encoding) = host.request_header("content-encoding") {
            if !encoding.eq_ignore_ascii_case("identity") {
                return self.unreadable(host, kind, RequestError::Encoded);
            }
        }
        // Ask the provider for an uncompressed response: its usage must be readable.
        host.set_request_header("accept-encoding", None);
        let who = Identity::read(host, &self.filter);
        count_retry(host, kind, who.tenant_tag.as_deref());
        let cache = self
            .filter
            .config
            .cache
            .as_ref()
            .map(|c| cached::CacheHeaders::read(host, c));
        self.phase = Phase::Body(Box::new(Pending {
            kind,
            path,
            who,
            cache,
        }));
        if self.filter.config.hold_request_headers {
            Action::Pause
        } else {
            // Count-and-reject mode: the headers go on now, the body is still held (in
            // on_request_body) until it is complete and judged.
            Action::Continue
        }
    }

    /// A request body chunk arrived; `body_size` is everything buffered so far.
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        self.buffered = body_size;
        match &self.phase {
            Phase::AdminBody if end_of_stream => {
                let body = host.request_body(body_size).unwrap_or_default();
                admin::on_topup_body(host, &self.filter.config, &body);
                self.phase = Phase::Idle;
                Action::Pause
            }
            Phase::AdminBody | Phase::Body(_) if !end_of_stream => Action::Pause,
            Phase::Body(_) => {
                let Phase::Body(pending) = std::mem::replace(&mut self.phase, Phase::Idle) else {
                    return Action::Continue;
                };
                self.request_complete(host, pending, body_size, true)
            }
            _ => Action::Continue,
        }
    }

    /// The whole request body is here: count it, answer it from the cache (or wait for an
    /// identical one, when `may_wait`), admit it (or refuse it), edit it.
    fn request_complete(
        &mut self,
        host: &mut dyn Host,
        pending: Box<Pending>,
        size: usize,
        may_wait: bool,
    ) -> Action {
        let filter = Rc::clone(&self.filter);
        let original = host.request_body(size).unwrap_or_default();
        let read = match request::read(&pending, &original) {
            Ok(read) => read,
            Err(e) => return self.not_counted(host, pending.kind, e),
        };
        // The cache first: a hit is answered without counting the prompt.
        let model = read.model.clone();
        let considered = pending
            .cache
            .as_ref()
            .and_then(|h| cached::consider(&filter, host, pending.kind, &model, h, &original));
        if considered.is_none() && pending.cache.is_some() {
            self.cache_status = Some("bypass");
        }
        let charge_hits = filter.config.cache.as_ref().is_some_and(|c| c.charge_hits);
        let mut charged_hit = None;
        if let (Some(c), Some(h)) = (&considered, &pending.cache) {
            match cached::begin(&filter, host, pending.kind, &model, h, c, may_wait) {
                Some(cached::Begin::Hit(entry)) => {
                    let who = cached::Answered {
                        pending: &pending,
                        model: &model,
                    };
                    if charge_hits {
                        // Judged by the local budgets below, once counted.
                        charged_hit = Some(entry);
                    } else if cached::serve(&filter, host, c, &entry, cached::Served::Hit, &who) {
                        return Action::Pause;
                    }
                }
                Some(cached::Begin::Wait { key, until_ms }) => {
                    let own = host.now_ms().saturating_add(
                        filter
                            .config
                            .cache
                            .as_ref()
                            .map_or(0, |c| i64::try_from(c.coalesce_wait_ms).unwrap_or(0)),
                    );
                    let Some(considered) = considered else {
                        return Action::Continue;
                    };
                    self.phase = Phase::Waiting(Box::new(Waiting {
                        size,
                        key,
                        considered,
                        model,
                        until_ms: until_ms.min(own),
                        pending,
                    }));
                    return Action::Pause;
                }
                Some(cached::Begin::Go(caching)) => {
                    let status = if c.read { "miss" } else { "refresh" };
                    cached::lookup_stat(
                        host,
                        pending.kind,
                        pending.who.tenant_tag.as_deref(),
                        status,
                    );
                    self.cache_status = Some(status);
                    self.caching = Some(caching);
                }
                None => {}
            }
        }
        let counted = match request::count(&filter, read) {
            Ok(counted) => counted,
            Err(e) => return self.not_counted(host, pending.kind, e),
        };
        let pending = &*pending;
        let admission = match admit::local(&filter, host, self.id, pending, &counted) {
            Ok(admission) => admission,
            Err(refused) => {
                let tenant = pending.who.tenant_tag.as_deref();
                return self.refuse(
                    host,
                    pending.kind,
                    Some(counted.prompt),
                    tenant,
                    pending.who.priority,
                    refused,
                );
            }
        };
        if let (Some(entry), Some(c)) = (charged_hit, &considered) {
            // `charge_hits`: admitted by the local budgets as if it went upstream, and
            // charged what the answer cost when it was made.
            let who = cached::Answered {
                pending,
                model: &counted.model,
            };
            if cached::serve(&filter, host, c, &entry, cached::Served::Hit, &who) {
                // Charged as the model whose answer it is, never a reroute's.
                let mut admitted = admission.admitted;
                admitted.served_model = counted.model.clone();
                admitted.model_tag = filter.model_tag(&counted.model);
                admitted.rerouted = false;
                let billed = meter::Billed::Usage {
                    source: meter::Source::Provider,
                    usage: entry.usage,
                };
                settle::exchange(&filter, host, self.id, &admitted, "cache", &billed, &[]);
                return Action::Pause;
            }
        }
        let admit::Admission {
            mut admitted,
            decision,
            edits,
            path,
        } = admission;
        // Rerouted to another model: its answer is another one; look that up instead.
        if admitted.served_model != counted.model {
            if let (Some(c), Some(h)) = (&considered, &pending.cache) {
                self.release_claim(host);
                match cached::begin(
                    &filter,
                    host,
                    pending.kind,
                    &admitted.served_model,
                    h,
                    c,
                    false,
                ) {
                    Some(cached::Begin::Hit(entry)) => {
                        let who = cached::Answered {
                            pending,
                            model: &admitted.served_model,
                        };
                        if cached::serve(&filter, host, c, &entry, cached::Served::Hit, &who) {
                            settle::refund(&filter, host, self.id, &admitted.reservations);
                            self.phase = Phase::Idle;
                            return Action::Pause;
                        }
                    }
                    Some(cached::Begin::Go(caching)) => self.caching = Some(caching),
                    _ => {}
                }
            }
        }
        // The body as it goes upstream, edited once.
        match rewrite::apply(&original, &counted.parsed, &edits) {
            Ok(Some(body)) => {
                host.replace_request_body(original.len(), &body);
                // Envoy does not fix content-length when a filter replaces the body.
                host.set_request_header("content-length", Some(&body.len().to_string()));
            }
            Ok(None) => {}
            Err(_) => {
                host.log(
                    Level::Error,
                    &format!("#{} could not edit the request body; refused", self.id),
                );
                let refused = Refused {
                    refusal: Box::new(Refusal::Unrewritable),
                    budget: None,
                    refund: std::mem::take(&mut admitted.reservations),
                };
                return self.refuse_admitted(host, &admitted, refused);
            }
        }
        if admitted.rerouted {
            let reroute = &filter.config.reroute;
            if let Some(path) = &path {
                host.set_request_header(":path", Some(path));
            }
            host.set_request_header(&reroute.header, Some(&reroute.value));
            host.clear_route_cache();
        }
        if host.log_enabled(Level::Debug) {
            host.log(
                Level::Debug,
                &format!(
                    "#{} {} encoding={} prompt_tokens={} exact={} stream={} max_output={} priority={} reserved_in={} rerouted={}",
                    self.id,
                    admitted.kind.tag(),
                    admitted.counting.encoding,
                    admitted.prompt.tokens,
                    admitted.prompt.exact,
                    counted.parsed.stream(),
                    counted.max_output,
                    admitted.priority.tag(),
                    admitted.reservations.len(),
                    admitted.rerouted,
                ),
            );
        }
        if filter.config.global_budgets.is_empty() {
            self.forward(host, admitted, decision);
            return Action::Continue;
        }
        let checks = admit::dispatch_global(
            &filter,
            host,
            &admitted,
            &pending.who.global_ids,
            counted.max_output,
        );
        if checks.iter().all(|c| c.outcome.is_some()) {
            return self.conclude(host, Box::new(admitted), decision, &checks);
        }
        self.phase = Phase::Checking {
            admitted: Box::new(admitted),
            decision,
            checks,
        };
        Action::Pause
    }

    /// The rate limit service answered call `token` (`grpc_status` as Envoy reports it).
    pub fn on_grpc_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        grpc_status: u32,
        body_size: usize,
    ) {
        let Phase::Checking { checks, .. } = &mut self.phase else {
            return;
        };
        let Some(check) = checks
            .iter_mut()
            .find(|c| c.token == token && c.outcome.is_none())
        else {
            return;
        };
        let body = if grpc_status == 0 {
            host.grpc_response_body(body_size)
        } else {
            None
        };
        let protocol = self
            .filter
            .config
            .rate_limit_service
            .as_ref()
            .map_or(Protocol::Envoy, |s| s.protocol);
        check.outcome = Some(global::outcome(protocol, grpc_status, body.as_deref()));
        if checks.iter().any(|c| c.outcome.is_none()) {
            return;
        }
        let Phase::Checking {
            admitted,
            decision,
            checks,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        if self.conclude(host, admitted, decision, &checks) == Action::Continue {
            host.resume_request();
        }
    }

    /// Every global check has an outcome: forward (Continue) or answer (Pause).
    fn conclude(
        &mut self,
        host: &mut dyn Host,
        mut admitted: Box<Admitted>,
        decision: Option<Decision>,
        checks: &[global::Check],
    ) -> Action {
        let filter = Rc::clone(&self.filter);
        match admit::conclude_global(&filter, host, self.id, &mut admitted, checks) {
            Ok(()) => {
                // A global budget's reported usage can turn an allowed request into a
                // warned one.
                let decision = match decision {
                    Some(Decision::Allowed) if !admitted.warnings.is_empty() => {
                        Some(Decision::Warned)
                    }
                    other => other,
                };
                self.forward(host, *admitted, decision);
                Action::Continue
            }
            Err(refused) => self.refuse_admitted(host, &admitted, refused),
        }
    }

    /// The request goes upstream: count its decision, read its response as it comes.
    fn forward(&mut self, host: &mut dyn Host, admitted: Admitted, decision: Option<Decision>) {
        if let Some(decision) = decision {
            count_decision(host, &admitted, decision, None);
        }
        self.phase = Phase::Forwarded(Box::new(Forwarded {
            admitted,
            meter: Meter::Pending,
            cluster: None,
        }));
    }

    /// Refuse a request the local budgets had admitted.
    fn refuse_admitted(
        &mut self,
        host: &mut dyn Host,
        admitted: &Admitted,
        refused: Refused,
    ) -> Action {
        self.refuse(
            host,
            admitted.kind,
            Some(admitted.prompt),
            admitted.tenant_tag.as_deref(),
            admitted.priority,
            refused,
        )
    }

    /// Answer a refused request: refund what it had reserved, count the decision, reply.
    fn refuse(
        &mut self,
        host: &mut dyn Host,
        api: ApiKind,
        prompt: Option<PromptCount>,
        tenant: Option<&str>,
        priority: Priority,
        refused: Refused,
    ) -> Action {
        self.phase = Phase::Idle;
        self.release_claim(host);
        settle::refund(&self.filter, host, self.id, &refused.refund);
        decision_stat(
            host,
            tenant,
            priority,
            refused.refusal.decision(),
            refused.budget.as_deref(),
        );
        self.reply(host, api, prompt, &refused.refusal);
        Action::Pause
    }

    fn reply(
        &self,
        host: &mut dyn Host,
        api: ApiKind,
        prompt: Option<PromptCount>,
        refusal: &Refusal,
    ) {
        let asked = Asked {
            api,
            prompt_tokens: prompt.map(|p| p.tokens),
            now_ms: host.now_ms(),
            should_retry_max_secs: self.filter.config.should_retry_max_secs,
        };
        reply::refuse(host, &asked, refusal);
    }

    /// A body that could not be read or counted: the malformed-request policy, or (no
    /// tokenizer for its model, which a validated configuration rules out) passed through.
    fn not_counted(&mut self, host: &mut dyn Host, kind: ApiKind, why: NotCounted) -> Action {
        match why {
            NotCounted::Unreadable(e) => self.unreadable(host, kind, e),
            NotCounted::NoTokenizer => {
                self.release_claim(host);
                host.log(
                    Level::Error,
                    &format!(
                        "#{} no tokenizer for the request's model; passing through",
                        self.id
                    ),
                );
                passthrough(host, "internal");
                Action::Continue
            }
        }
    }

    /// Give up the cache claim, if any: identical requests waiting for it go upstream.
    fn release_claim(&mut self, host: &mut dyn Host) {
        if let Some(caching) = self.caching.take() {
            if let (Some(generation), Some(cache)) = (caching.claim, &self.filter.config.cache) {
                let bounds = cache.bounds(self.filter.config.cas_retries);
                crate::cache::store::release(host, &bounds, &caching.key, generation);
            }
        }
    }

    /// Whether the request waits for an identical one in flight (the glue asks the root
    /// tick to call [`Exchange::on_wake`] until it no longer does).
    pub fn waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting(_))
    }

    /// The root tick looks again for the answer this request waits for: serve it, keep
    /// waiting, or — the first request failed, or the wait is over — go upstream.
    pub fn on_wake(&mut self, host: &mut dyn Host) -> Wake {
        let Phase::Waiting(w) = &self.phase else {
            return Wake::Done;
        };
        let filter = Rc::clone(&self.filter);
        let now = host.now_ms();
        let found = cached::recheck(&filter, host, &w.key);
        match found {
            Some(crate::cache::Found::Pending { .. }) if now < w.until_ms => {
                return Wake::Waiting;
            }
            _ => {}
        }
        let Phase::Waiting(w) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Wake::Done;
        };
        let Waiting {
            pending,
            size,
            considered,
            model,
            until_ms,
            ..
        } = *w;
        let charged = filter.config.cache.as_ref().is_some_and(|c| c.charge_hits);
        if let Some(crate::cache::Found::Hit(entry)) = found.as_ref().filter(|_| !charged) {
            let who = cached::Answered {
                pending: &pending,
                model: &model,
            };
            if cached::serve(
                &filter,
                host,
                &considered,
                entry,
                cached::Served::Coalesced,
                &who,
            ) {
                return Wake::Done;
            }
        }
        // Not answered: the wait is over, or the first request failed (its claim is gone).
        // (With `charge_hits` the answer is served through the budgets, as a hit.)
        if !matches!(found, Some(crate::cache::Found::Hit(_))) {
            let why = if now >= until_ms {
                "waited_out"
            } else {
                "first_failed"
            };
            cached::lookup_stat(host, pending.kind, pending.who.tenant_tag.as_deref(), why);
        }
        match self.request_complete(host, pending, size, false) {
            Action::Continue => Wake::Resume,
            Action::Pause => Wake::Done,
        }
    }

    /// An LLM request whose body cannot be read: the configured policy applies.
    fn unreadable(&mut self, host: &mut dyn Host, kind: ApiKind, error: RequestError) -> Action {
        self.phase = Phase::Idle;
        let policy = self.filter.config.malformed_request;
        host.counter_add(
            Stat::new(catalog::PARSE_FAILURES)
                .tag("stage", "request")
                .tag("api", kind.tag())
                .tag("reason", reply::unreadable_reason(&error))
                .name(),
            1,
        );
        host.log(
            Level::Info,
            &format!(
                "#{} unreadable {} request ({}): {}",
                self.id,
                kind.tag(),
                match policy {
                    MalformedPolicy::Reject => "rejected",
                    MalformedPolicy::Pass => "passed",
                },
                error
            ),
        );
        match policy {
            MalformedPolicy::Pass => {
                passthrough(host, "malformed");
                Action::Continue
            }
            MalformedPolicy::Reject => {
                self.reply(host, kind, None, &Refusal::Unreadable(error));
                Action::Pause
            }
        }
    }

    /// Request trailers arrived: the body is complete (HTTP/2 requests with trailers never
    /// flag the end of their body, and must not slip through uncounted).
    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> Action {
        match self.phase {
            Phase::Body(_) | Phase::AdminBody => {
                let size = self.buffered;
                self.on_request_body(host, size, true)
            }
            _ => Action::Continue,
        }
    }

    /// Response headers arrived.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        let Phase::Forwarded(f) = &mut self.phase else {
            return Action::Continue;
        };
        let a = &f.admitted;
        host.set_response_header(PROMPT_TOKENS_HEADER, Some(&a.prompt.tokens.to_string()));
        if let Some(rate) = a.rate {
            let [limit, remaining, reset] = reply::RATE_LIMIT_HEADERS;
            host.set_response_header(limit, Some(&rate.limit.to_string()));
            host.set_response_header(remaining, Some(&rate.remaining.to_string()));
            host.set_response_header(reset, Some(&go_duration(rate.reset_ms)));
        }
        if !a.warnings.is_empty() {
            host.set_response_header(WARNING_HEADER, Some(&a.warnings.join(",")));
        }
        if a.rerouted {
            host.set_response_header(REROUTED_HEADER, Some(&a.served_model));
        }
        if let Some(status) = self.cache_status {
            host.set_response_header(CACHE_HEADER, Some(status));
        }
        if let Some(caching) = &mut self.caching {
            caching.on_response_headers(host);
        }
        f.cluster = host.upstream_cluster();
        f.meter = Meter::start(host, &self.filter.config, a.kind);
        if end_of_stream {
            self.settle(host, true);
        }
        Action::Continue
    }

    /// A response body chunk of `body_size` bytes arrived. Never delays it.
    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Phase::Forwarded(f) = &mut self.phase else {
            return Action::Continue;
        };
        let counter = self.filter.tokenizers.counter(f.admitted.counting.encoding);
        let max_json = self.filter.config.max_response_body_bytes;
        f.meter.feed(host, body_size, max_json, counter);
        if let (Some(caching), Some(cache)) = (&mut self.caching, &self.filter.config.cache) {
            if caching.capturing() && body_size > 0 {
                if let Some(chunk) = host.response_body(body_size) {
                    caching.on_body(&chunk, cache.max_entry_bytes);
                }
            }
        }
        if end_of_stream {
            self.settle(host, true);
        }
        Action::Continue
    }

    /// The stream is over (completed, reset or abandoned). Settles anything not yet settled.
    pub fn on_done(&mut self, host: &mut dyn Host) {
        self.settle(host, false);
    }

    /// Settle the exchange, exactly once.
    fn settle(&mut self, host: &mut dyn Host, ended: bool) {
        let (forwarded, asked) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Forwarded(f) => (*f, true),
            // The client left while the rate limit service was asked: Envoy cancels the
            // calls, nothing went upstream, local reservations go back.
            Phase::Checking { admitted, .. } => (
                Forwarded {
                    admitted: *admitted,
                    meter: Meter::Pending,
                    cluster: None,
                },
                false,
            ),
            _ => {
                self.release_claim(host);
                return;
            }
        };
        let filter = &self.filter;
        let Forwarded {
            admitted,
            meter,
            cluster,
        } = forwarded;
        let cluster = cluster
            .or_else(|| host.upstream_cluster())
            .unwrap_or_else(|| "none".to_string());
        let end = End {
            kind: admitted.kind,
            prompt: admitted.prompt,
            counting: admitted.counting,
            counter: filter.tokenizers.counter(admitted.counting.encoding),
            abandoned: filter.config.abandoned,
            ended,
            asked,
        };
        let (billed, notes) = meter.finish(&end);
        settle::exchange(filter, host, self.id, &admitted, &cluster, &billed, &notes);
        if let Some(caching) = self.caching.take() {
            cached::finish(filter, host, self.id, caching, &billed, &notes, ended);
        }
        if host.log_enabled(Level::Debug) {
            let (prompt, completion, source) = match &billed {
                meter::Billed::Usage { source, usage } => (usage.input, usage.output, source.tag()),
                meter::Billed::Unknown => (admitted.prompt.tokens, 0, "counted"),
                meter::Billed::Nothing => (0, 0, "none"),
            };
            host.log(
                Level::Debug,
                &format!(
                    "#{} settled {} prompt={prompt} completion={completion} source={source}",
                    self.id,
                    admitted.kind.tag(),
                ),
            );
        }
    }
}

/// A request the official SDKs mark as a retry (`x-stainless-retry-count`, sent by the
/// OpenAI and Anthropic SDKs): paid for again, so worth a counter of its own.
fn count_retry(host: &mut dyn Host, kind: ApiKind, tenant: Option<&str>) {
    if crate::budget::plan::is_retry(host) {
        let mut stat = Stat::new(catalog::RETRIES);
        if let Some(t) = tenant {
            stat = stat.tag("tenant", t);
        }
        host.counter_add(stat.tag("api", kind.tag()).name(), 1);
    }
}

/// A request the filter lets through without counting.
fn passthrough(host: &mut dyn Host, reason: &str) {
    host.counter_add(
        Stat::new(catalog::PASSTHROUGH).tag("reason", reason).name(),
        1,
    );
}

#[cfg(test)]
mod tests;
