//! Prometheus metrics (prometheus-client): verdicts by direction and reason
//! (from the datapath's per-CPU counters), map occupancy and capacity,
//! compile and apply latency, last sync, endpoints, event accounting.

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub verdicts: Family<Labels, Counter>,
    pub events: Family<Labels, Counter>,
    pub map_entries: Family<Labels, Gauge>,
    pub map_capacity: Family<Labels, Gauge>,
    pub map_update_errors: Family<Labels, Counter>,
    pub compile_seconds: Histogram,
    pub apply_seconds: Histogram,
    /// From a source receiving a change to the end of its map writes (the
    /// flip that makes it enforced), by `kind` (pod, namespace, policy,
    /// cluster_policy, node, service, other).
    pub change_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub endpoints: Gauge,
    pub pending_endpoints: Gauge,
    /// Pod veths the last sync found without the programs.
    pub veths_without_programs: Gauge,
    /// 1 when `/readyz` says ready.
    pub ready: Gauge,
    pub generation: Gauge,
    pub source_errors: Gauge,
    /// API connections refused, by listener and reason.
    pub api_refused: Family<Labels, Counter>,
    /// Flow-table entries each endpoint holds, and its share.
    pub flow_entries: Family<Labels, Gauge>,
    pub flow_share: Gauge,
    /// Each endpoint's share accounting (admitted, refused, reclaimed).
    pub flow_quota: Family<Labels, Counter>,
    /// Watchers of the kube source restarted after they stopped, by kind.
    pub watcher_restarts: Family<Labels, Counter>,
    /// 1 per node device with XDP, labelled with the mode the kernel runs.
    pub xdp_attached: Family<Labels, Gauge>,
    /// Last value seen of each kernel counter slot (the kernel counts; we
    /// add the difference).
    last_counters: Vec<u64>,
    /// Last share counts seen, by (endpoint, outcome).
    last_quota: std::collections::BTreeMap<(String, &'static str), u64>,
}

/// One endpoint's flow-table pressure.
#[derive(Clone, Debug)]
pub struct QuotaRow {
    /// `namespace/pod`.
    pub endpoint: String,
    /// Entries it holds in the flow table.
    pub entries: u64,
    /// Its share accounting, summed over CPUs.
    pub state: netpol_common::QuotaState,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency() -> Histogram {
    // 50 us .. ~3 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    /// One change enforced, `secs` after its source received it.
    pub fn observe_change(&self, kind: &str, secs: f64) {
        self.change_seconds
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .observe(secs);
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("netpol");
        let m = Self {
            verdicts: Family::default(),
            events: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            map_update_errors: Family::default(),
            compile_seconds: latency(),
            apply_seconds: latency(),
            change_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
            last_sync: Gauge::default(),
            endpoints: Gauge::default(),
            pending_endpoints: Gauge::default(),
            veths_without_programs: Gauge::default(),
            ready: Gauge::default(),
            generation: Gauge::default(),
            source_errors: Gauge::default(),
            api_refused: Family::default(),
            last_counters: Vec::new(),
            flow_entries: Family::default(),
            flow_share: Gauge::default(),
            flow_quota: Family::default(),
            watcher_restarts: Family::default(),
            xdp_attached: Family::default(),
            last_quota: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "verdicts",
            "Packets by direction (pod's point of view) and verdict reason",
            m.verdicts.clone(),
        );
        registry.register(
            "events",
            "Verdict events: sent, or not sent (rate_limited, ringbuf_full)",
            m.events.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each datapath map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Maximum entries of each datapath map",
            m.map_capacity.clone(),
        );
        registry.register(
            "map_update_errors",
            "Map updates that failed (a full map: what could not be programmed stays denied)",
            m.map_update_errors.clone(),
        );
        registry.register(
            "compile_seconds",
            "Time to compile cluster state into map contents",
            m.compile_seconds.clone(),
        );
        registry.register(
            "change_seconds",
            "Time from a source receiving a change (watch event, file read) to the end of its map writes, by kind",
            m.change_seconds.clone(),
        );
        registry.register(
            "apply_seconds",
            "Time to write a compile's map updates and attachments",
            m.apply_seconds.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last sync that applied everything (map writes all succeeded)",
            m.last_sync.clone(),
        );
        registry.register("endpoints", "Local pods enforced", m.endpoints.clone());
        registry.register(
            "xdp_attached",
            "Node devices running netpol's XDP program, by the mode the kernel runs it in",
            m.xdp_attached.clone(),
        );
        registry.register(
            "veths_without_programs",
            "Pod veths without the agent's programs (after the last sync)",
            m.veths_without_programs.clone(),
        );
        registry.register(
            "ready",
            "1 when the agent enforces the current state (/readyz), else 0",
            m.ready.clone(),
        );
        registry.register(
            "pending_endpoints",
            "Pod veths whose pod is not known yet (traffic denied)",
            m.pending_endpoints.clone(),
        );
        registry.register(
            "policy_generation",
            "Policy generation (bumped when a change can revoke established flows)",
            m.generation.clone(),
        );
        registry.register(
            "source_errors",
            "Manifests or objects that could not be used",
            m.source_errors.clone(),
        );
        registry.register(
            "api_refused",
            "API requests refused: too large, too slow (timeout), malformed, or over the connection limit (busy)",
            m.api_refused.clone(),
        );
        registry.register(
            "flow_entries",
            "Flow-table entries each local pod holds",
            m.flow_entries.clone(),
        );
        registry.register(
            "flow_share",
            "Flow-table entries one pod may hold (0: no shares)",
            m.flow_share.clone(),
        );
        registry.register(
            "flow_quota",
            "New flows by pod and outcome of its share: admitted, refused (dropped as flow_quota), \
             reclaimed_gone (a slot whose flow had left the table) and reclaimed_expired \
             (a slot whose flow was idle past its timeout)",
            m.flow_quota.clone(),
        );
        registry.register(
            "watcher_restarts",
            "Kube-source watchers spawned again after they stopped (a panic), by kind",
            m.watcher_restarts.clone(),
        );
        Self { registry, ..m }
    }

    /// Set the watcher restart counters to the source's counts.
    pub fn observe_watcher_restarts(&mut self, restarts: &[(String, u64)]) {
        for (kind, n) in restarts {
            let c = self
                .watcher_restarts
                .get_or_create(&vec![("kind".to_string(), kind.clone())]);
            let seen = c.get();
            if *n > seen {
                c.inc_by(n - seen);
            }
        }
    }

    /// Fold in each endpoint's flow-table pressure. Endpoints no longer
    /// listed lose their entries gauge.
    pub fn observe_quota(&mut self, rows: &[QuotaRow], share: u64) {
        self.flow_share.set(share as i64);
        let listed: std::collections::BTreeSet<&str> =
            rows.iter().map(|r| r.endpoint.as_str()).collect();
        let gone: std::collections::BTreeSet<String> = self
            .last_quota
            .keys()
            .filter(|(e, _)| !listed.contains(e.as_str()))
            .map(|(e, _)| e.clone())
            .collect();
        for e in gone {
            self.flow_entries.remove(&vec![("endpoint".into(), e)]);
        }
        self.last_quota
            .retain(|(e, _), _| listed.contains(e.as_str()));
        for r in rows {
            self.flow_entries
                .get_or_create(&vec![("endpoint".into(), r.endpoint.clone())])
                .set(r.entries as i64);
            for (outcome, v) in [
                ("admitted", r.state.admitted),
                ("refused", r.state.refused),
                ("reclaimed_gone", r.state.reclaimed_gone),
                ("reclaimed_expired", r.state.reclaimed_expired),
            ] {
                let last = self
                    .last_quota
                    .entry((r.endpoint.clone(), outcome))
                    .or_insert(0);
                // A pod whose state was reset (removed, then a new pod on the
                // ifindex) counts from zero again.
                let d = v.saturating_sub(*last);
                *last = v;
                self.flow_quota
                    .get_or_create(&vec![
                        ("endpoint".into(), r.endpoint.clone()),
                        ("outcome".into(), outcome.into()),
                    ])
                    .inc_by(d);
            }
        }
    }

    /// Fold in the kernel's counters (summed over CPUs, indexed by
    /// `netpol_common::counter_index`).
    pub fn observe_counters(&mut self, counters: &[u64]) {
        use netpol_common::*;
        // Nothing read (the caller's read of the map failed): nothing to
        // count. Taking it as a reset would count every packet again at the
        // next good read.
        if counters.is_empty() {
            return;
        }
        if self.last_counters.len() != counters.len() {
            self.last_counters = vec![0; counters.len()];
        }
        let delta = |last: &mut Vec<u64>, i: usize| -> u64 {
            let d = counters[i].saturating_sub(last[i]);
            last[i] = counters[i];
            d
        };
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for r in 0..REASON_COUNT {
                let i = counter_index(dir, r) as usize;
                if i >= counters.len() {
                    continue;
                }
                let d = delta(&mut self.last_counters, i);
                let c = self.verdicts.get_or_create(&vec![
                    ("direction".into(), direction_name(dir).into()),
                    ("reason".into(), reason_name(r).into()),
                    (
                        "verdict".into(),
                        if reason_passes(r) { "pass" } else { "drop" }.into(),
                    ),
                ]);
                c.inc_by(d);
            }
        }
        for (slot, name) in [
            (COUNTER_EVENTS_SENT, "sent"),
            (COUNTER_EVENTS_RATE_LIMITED, "rate_limited"),
            (COUNTER_EVENTS_RINGBUF_FULL, "ringbuf_full"),
        ] {
            let i = slot as usize;
            if i < counters.len() {
                let d = delta(&mut self.last_counters, i);
                self.events
                    .get_or_create(&vec![("outcome".into(), name.into())])
                    .inc_by(d);
            }
        }
    }

    /// `netpol_xdp_attached{device, mode} 1` for each device of `modes`
    /// (device name -> the mode the kernel runs), and nothing else.
    pub fn set_xdp_modes(&self, modes: &std::collections::BTreeMap<String, String>) {
        self.xdp_attached.clear();
        for (device, mode) in modes {
            self.xdp_attached
                .get_or_create(&vec![
                    ("device".to_string(), device.clone()),
                    ("mode".to_string(), mode.clone()),
                ])
                .set(1);
        }
    }

    pub fn set_map(&self, map: &str, entries: usize, capacity: u32) {
        let l = vec![("map".to_string(), map.to_string())];
        self.map_entries.get_or_create(&l).set(entries as i64);
        self.map_capacity.get_or_create(&l).set(capacity as i64);
    }

    pub fn map_error(&self, map: &str) {
        self.map_update_errors
            .get_or_create(&vec![("map".to_string(), map.to_string())])
            .inc();
    }

    pub fn api_refused(&self, listener: &str, reason: &str) {
        self.api_refused
            .get_or_create(&vec![
                ("listener".to_string(), listener.to_string()),
                ("reason".to_string(), reason.to_string()),
            ])
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use netpol_common::*;

    use super::*;

    #[test]
    fn xdp_modes_are_one_series_per_device() {
        let m = Metrics::new();
        m.set_xdp_modes(&std::collections::BTreeMap::from([
            ("eth0".to_string(), "generic".to_string()),
            ("eth1".to_string(), "native".to_string()),
        ]));
        m.set_xdp_modes(&std::collections::BTreeMap::from([(
            "eth0".to_string(),
            "native".to_string(),
        )]));
        let out = m.render();
        assert!(
            out.contains(r#"netpol_xdp_attached{device="eth0",mode="native"} 1"#),
            "{out}"
        );
        assert!(!out.contains(r#"mode="generic""#), "{out}");
        assert!(!out.contains(r#"device="eth1""#), "{out}");
    }

    #[test]
    fn kernel_counters_become_verdict_metrics_by_difference() {
        let mut m = Metrics::new();
        let mut c = vec![0u64; COUNTER_SLOTS as usize];
        c[counter_index(DIR_INGRESS, REASON_POLICY_DENY) as usize] = 5;
        c[COUNTER_EVENTS_RATE_LIMITED as usize] = 2;
        m.observe_counters(&c);
        c[counter_index(DIR_INGRESS, REASON_POLICY_DENY) as usize] = 7;
        m.observe_counters(&c);
        m.set_map("policy", 10, 100);
        let text = m.render();
        assert!(
            text.contains(
                r#"netpol_verdicts_total{direction="ingress",reason="policy_deny",verdict="drop"} 7"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"netpol_events_total{outcome="rate_limited"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"netpol_map_capacity{map="policy"} 100"#),
            "{text}"
        );
    }

    #[test]
    fn a_failed_counter_read_counts_nothing_twice() {
        let mut m = Metrics::new();
        let mut c = vec![0u64; COUNTER_SLOTS as usize];
        c[counter_index(DIR_INGRESS, REASON_POLICY_DENY) as usize] = 5;
        m.observe_counters(&c);
        m.observe_counters(&[]);
        c[counter_index(DIR_INGRESS, REASON_POLICY_DENY) as usize] = 7;
        m.observe_counters(&c);
        let text = m.render();
        assert!(
            text.contains(
                r#"netpol_verdicts_total{direction="ingress",reason="policy_deny",verdict="drop"} 7"#
            ),
            "{text}"
        );
    }

    #[test]
    fn flow_table_pressure_is_exported_per_pod() {
        let mut m = Metrics::new();
        let row = |refused| QuotaRow {
            endpoint: "y/c".into(),
            entries: 64,
            state: QuotaState {
                admitted: 64,
                refused,
                ..QuotaState::default()
            },
        };
        m.observe_quota(&[row(500)], 64);
        m.observe_quota(&[row(576)], 64);
        let text = m.render();
        for want in [
            r#"netpol_flow_quota_total{endpoint="y/c",outcome="refused"} 576"#,
            r#"netpol_flow_quota_total{endpoint="y/c",outcome="admitted"} 64"#,
            r#"netpol_flow_entries{endpoint="y/c"} 64"#,
            "netpol_flow_share 64",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        // The pod is gone: its entries gauge goes with it.
        m.observe_quota(&[], 64);
        assert!(
            !m.render()
                .contains(r#"netpol_flow_entries{endpoint="y/c"}"#)
        );
    }
}
