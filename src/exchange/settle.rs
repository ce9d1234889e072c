//! The settle phase, and the only path a reservation is given back on: the exchange's cost
//! replaces what its budgets hold — a settlement when it ends, a refund (a cost of 0) when
//! it is refused after some budgets had reserved — and every write that is lost is counted
//! and logged ([`catalog::SETTLE_FAILURES`]).

use std::rc::Rc;

use crate::budget::plan::{self, BudgetKey, Reservation};
use crate::budget::{Budget, Standing};
use crate::filter::Filter;
use crate::global::Hold;
use crate::host::{Host, Level};
use crate::stats::{add, catalog, Stat};

use super::meter::{Billed, Note, Source};
use super::Admitted;

/// Give `reservations` back in full (the request was refused after they were drawn).
pub(super) fn refund(filter: &Filter, host: &mut dyn Host, id: u32, reservations: &[Reservation]) {
    settle_budgets(filter, host, id, reservations, |_, _| 0);
}

/// Settle an exchange that went upstream (or was abandoned on the way): stats, local
/// budgets, global budgets.
pub(super) fn exchange(
    filter: &Filter,
    host: &mut dyn Host,
    id: u32,
    admitted: &Admitted,
    cluster: &str,
    billed: &Billed,
    notes: &[Note],
) {
    record_usage(filter, host, admitted, cluster, billed, notes);
    let config = &filter.config;
    settle_budgets(
        filter,
        host,
        id,
        &admitted.reservations,
        |budget, reservation| {
            match billed {
                Billed::Nothing => 0,
                Billed::Usage { usage, .. } => {
                    plan::actual_amount(config, budget, &admitted.served_model, usage)
                }
                // Keep what was reserved: the output is unknown, the provider billed it.
                Billed::Unknown => reservation.drawn.total(),
            }
        },
    );
    settle_global(filter, host, admitted, billed);
}

/// The exchange's tokens, cost and what the meter noted, as stats.
fn record_usage(
    filter: &Filter,
    host: &mut dyn Host,
    admitted: &Admitted,
    cluster: &str,
    billed: &Billed,
    notes: &[Note],
) {
    let model = admitted.model_tag.as_str();
    // `name.tenant.…`: the tenant tag only when tenant tagging is on.
    let with_tenant = |name: &str| match &admitted.tenant_tag {
        Some(t) => Stat::new(name).tag("tenant", t),
        None => Stat::new(name),
    };
    let tagged = |name: &str| Stat::new(name).tag("model", model).tag("cluster", cluster);
    host.counter_add(
        with_tenant(catalog::REQUESTS)
            .tag("api", admitted.kind.tag())
            .tag("model", model)
            .tag("cluster", cluster)
            .name(),
        1,
    );
    add(
        host,
        &tagged(catalog::REQUEST_PROMPT_TOKENS),
        admitted.prompt.tokens,
    );
    if !admitted.prompt.exact {
        host.counter_add(tagged(catalog::PROMPT_ESTIMATES).name(), 1);
    }
    for note in notes {
        match note {
            Note::NoResponse => host.counter_add(tagged(catalog::NO_RESPONSE).name(), 1),
            Note::UpstreamError(class) => host.counter_add(
                tagged(catalog::UPSTREAM_ERRORS).tag("status", class).name(),
                1,
            ),
            Note::ParseFailure(reason) => parse_failure(host, admitted.kind.tag(), reason),
            Note::Incomplete => host.counter_add(tagged(catalog::RESPONSES_INCOMPLETE).name(), 1),
        }
    }
    let (prompt, completion, source) = match billed {
        Billed::Usage { source, usage } => (usage.input, usage.output, Some(*source)),
        Billed::Unknown => (admitted.prompt.tokens, 0, Some(Source::Counted)),
        Billed::Nothing => (0, 0, None),
    };
    if let Some(source) = source {
        if source == Source::Counted {
            host.counter_add(tagged(catalog::USAGE_COUNTED).name(), 1);
        }
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            let stat = with_tenant(catalog::TOKENS)
                .tag("kind", kind)
                .tag("source", source.tag())
                .tag("model", model)
                .tag("cluster", cluster);
            add(host, &stat, n);
            let per_request = with_tenant(catalog::TOKENS_PER_REQUEST)
                .tag("kind", kind)
                .tag("model", model);
            host.histogram_record(per_request.name(), n);
        }
    }
    // Spend, when the operator priced the serving model.
    if let Billed::Usage { usage, .. } = billed {
        if let Some(price) = filter.config.prices.get(&admitted.served_model) {
            let stat = with_tenant(catalog::COST_MICRO_USD)
                .tag("model", model)
                .tag("cluster", cluster);
            add(host, &stat, price.actual(usage));
        }
    }
}

/// A response (or request) the filter could not read.
pub(super) fn parse_failure(host: &mut dyn Host, api: &str, reason: &str) {
    host.counter_add(
        Stat::new(catalog::PARSE_FAILURES)
            .tag("stage", "response")
            .tag("api", api)
            .tag("reason", reason)
            .name(),
        1,
    );
}

/// Replace each reservation by `actual(budget, reservation)`, and record what happened.
fn settle_budgets(
    filter: &Filter,
    host: &mut dyn Host,
    id: u32,
    reservations: &[Reservation],
    actual: impl Fn(&Budget, &Reservation) -> u64,
) {
    if reservations.is_empty() {
        return;
    }
    let now_ms = host.now_ms();
    let report = plan::settle(host, &filter.config, reservations, actual, now_ms);
    if report.cas_retries > 0 {
        host.counter_add(
            Stat::new(catalog::CAS_RETRIES).name(),
            u64::from(report.cas_retries),
        );
    }
    gauges(filter, host, &report.standings);
    for (key, amount) in &report.consumed {
        if let Some(stats) = &key.stats {
            host.counter_add(&stats.settled, 1);
            if *amount > 0 {
                host.counter_add(&stats.consumed, *amount);
            }
        }
    }
    add(host, &Stat::new(catalog::REFUNDED), report.refunded);
    add(
        host,
        &Stat::new(catalog::CHARGED_EXTRA),
        report.charged_extra,
    );
    for name in &report.failed {
        host.counter_add(
            Stat::new(catalog::SETTLE_FAILURES)
                .tag("budget", name)
                .name(),
            1,
        );
        host.log(
            Level::Error,
            &format!("#{id} could not settle budget {name}: shared data contended or unavailable"),
        );
    }
}

/// Queue the global budgets' settlements: a commit of the real cost per Limitador
/// reservation; over `ShouldRateLimit`, what is owed beyond the hold (what it keeps beyond
/// the cost is counted: that protocol cannot give hits back).
fn settle_global(filter: &Filter, host: &mut dyn Host, admitted: &Admitted, billed: &Billed) {
    let config = &filter.config;
    for hold in &admitted.holds {
        let Some(budget) = config.global_budgets.get(hold.budget) else {
            continue;
        };
        let cost = match billed {
            Billed::Nothing => 0,
            Billed::Usage { usage, .. } => {
                plan::cost_in(&config.prices, budget.unit, &admitted.served_model, usage)
            }
            Billed::Unknown => hold.hits,
        };
        if hold.reservation.is_some() {
            // Limitador: the commit charges the real cost and gives the rest back.
            filter
                .settlements
                .borrow_mut()
                .commit(host, config, hold, cost);
        } else if cost > hold.hits {
            filter.settlements.borrow_mut().add(
                host,
                config,
                hold.budget,
                &hold.key,
                cost.saturating_sub(hold.hits),
            );
        } else {
            unreturned(filter, host, hold, hold.hits.saturating_sub(cost));
        }
    }
}

/// Give a refused request's `hold` back: commit a Limitador reservation at 0, or count
/// hits charged over `ShouldRateLimit` as unreturned.
pub(super) fn give_back(filter: &Filter, host: &mut dyn Host, hold: &Hold) {
    if hold.reservation.is_some() {
        filter
            .settlements
            .borrow_mut()
            .commit(host, &filter.config, hold, 0);
    } else {
        unreturned(filter, host, hold, hold.hits);
    }
}

/// `hits` of `hold` that the service keeps without a cost to match.
pub(super) fn unreturned(filter: &Filter, host: &mut dyn Host, hold: &Hold, hits: u64) {
    if let Some(budget) = filter.config.global_budgets.get(hold.budget) {
        add(
            host,
            &Stat::new(catalog::GLOBAL_UNRETURNED).tag("budget", &budget.name),
            hits,
        );
    }
}

/// Gauges of each touched budget key (see [`Filter::set_gauges`]).
pub(super) fn gauges(
    filter: &Filter,
    host: &mut dyn Host,
    standings: &[(usize, Rc<BudgetKey>, Standing)],
) {
    let now_ms = host.now_ms();
    for (budget, key, standing) in standings {
        filter.set_gauges(host, *budget, key, standing, now_ms);
    }
}
