use proptest::prelude::*;

use super::*;

const S: Millis = 1000;

fn knobs() -> ScalingKnobs {
    ScalingKnobs {
        min_concurrency: 0,
        max_concurrency: 4,
        keep_alive: 60,
        max_multiplexing: 1,
        ..ScalingKnobs::default()
    }
}

fn load(queued: u64, waited: Millis, in_flight: u64) -> AppLoad {
    AppLoad { queued, oldest_queued_at: (queued > 0).then_some(100 * S - waited), in_flight }
}

fn runner(id: &str, phase: Phase, in_flight: u32, idle_for: Millis, served: u64) -> RunnerView {
    RunnerView {
        id: id.into(),
        phase,
        managed: true,
        in_flight,
        started_at: 0,
        last_active_at: 100 * S - idle_for,
        served,
    }
}

#[test]
#[allow(clippy::type_complexity)]
fn desired_table() {
    // (queued, waited, in_flight, min, max, mux, buffer, perc, delay) -> desired
    let rows: &[(u64, Millis, u64, u32, u32, u32, u32, u32, u64, u32)] = &[
        (0, 0, 0, 0, 4, 1, 0, 0, 0, 0),       // idle app scales to zero
        (0, 0, 0, 1, 4, 1, 0, 0, 0, 1),       // min_concurrency stays warm
        (3, 0, 0, 0, 4, 1, 0, 0, 0, 3),       // one runner per queued request
        (9, 0, 0, 0, 4, 1, 0, 0, 0, 4),       // clamped to max
        (3, 0, 2, 0, 8, 2, 0, 0, 0, 3),       // ceil(5 / 2)
        (1, 0, 0, 0, 8, 4, 0, 0, 0, 1),       // multiplexing: one runner takes 4
        (0, 0, 0, 0, 8, 1, 2, 0, 0, 2),       // buffer with no load
        (4, 0, 0, 0, 8, 1, 1, 0, 0, 5),       // demand + buffer
        (4, 0, 0, 0, 8, 1, 0, 50, 0, 6),      // 50 % of 4
        (3, 0, 0, 0, 8, 1, 0, 50, 0, 5),      // ceil(1.5) = 2
        (4, 0, 0, 0, 8, 1, 3, 50, 0, 7),      // the larger of buffer and perc
        (4, 0, 0, 0, 5, 1, 3, 50, 0, 5),      // still clamped
        (2, 5 * S, 0, 0, 4, 1, 0, 0, 10, 0),  // scaling_delay not yet passed
        (2, 10 * S, 0, 0, 4, 1, 0, 0, 10, 2), // passed
        (2, 5 * S, 1, 0, 4, 1, 0, 0, 10, 1),  // in-flight work counts at once
        (0, 0, 0, 3, 3, 1, 2, 0, 0, 3),       // min == max
    ];
    for &(q, waited, inf, min, max, mux, buf, perc, delay, want) in rows {
        let k = ScalingKnobs {
            min_concurrency: min,
            max_concurrency: max,
            max_multiplexing: mux,
            concurrency_buffer: buf,
            concurrency_buffer_perc: perc,
            scaling_delay: delay,
            ..knobs()
        };
        let got = desired_runners(&load(q, waited, inf), &k, 100 * S);
        assert_eq!(got, want, "queued {q} waited {waited} in_flight {inf} knobs {k:?}");
    }
}

#[test]
fn scale_from_zero_starts_runners() {
    let d = autoscale(&load(3, 0, 0), &[], &knobs(), 100 * S, None);
    assert_eq!((d.desired, d.start), (3, 3));
    // Starting runners count: no second wave.
    let starting = [runner("a", Phase::Starting, 0, 0, 0), runner("b", Phase::Starting, 0, 0, 0)];
    let d = autoscale(&load(3, 0, 0), &starting, &knobs(), 100 * S, None);
    assert_eq!(d.start, 1);
}

#[test]
fn backoff_holds_starts() {
    let d = autoscale(&load(1, 0, 0), &[], &knobs(), 100 * S, Some(101 * S));
    assert_eq!((d.desired, d.start), (1, 0));
    let d = autoscale(&load(1, 0, 0), &[], &knobs(), 100 * S, Some(100 * S));
    assert_eq!(d.start, 1);
}

#[test]
fn keep_alive_table() {
    // (idle_for, served, keep_alive, min) -> stopped?
    let rows: &[(Millis, u64, u64, u32, bool)] = &[
        (59 * S, 3, 60, 0, false),  // not idle long enough
        (60 * S, 3, 60, 0, true),   // keep_alive reached
        (120 * S, 3, 60, 1, false), // min_concurrency keeps it
        (10 * S, 0, 60, 0, true),   // a fresh runner that never served goes after 10 s
        (9 * S, 0, 60, 0, false),
        (3 * S, 0, 2, 0, true), // keep_alive shorter than 10 s applies to fresh runners too
        (S, 5, 2, 0, false),
    ];
    for &(idle_for, served, keep, min, stopped) in rows {
        let k = ScalingKnobs { keep_alive: keep, min_concurrency: min, ..knobs() };
        let d = autoscale(&load(0, 0, 0), &[runner("a", Phase::Idle, 0, idle_for, served)], &k, 100 * S, None);
        assert_eq!(!d.stop.is_empty(), stopped, "idle {idle_for} served {served} keep {keep} min {min}: {d:?}");
        if stopped {
            assert_eq!(d.stop, vec![("a".to_string(), StopReason::Idle)]);
        }
    }
}

#[test]
fn scale_down_stops_longest_idle_first_and_never_busy_ones() {
    let rs = [
        runner("busy", Phase::Running, 1, 0, 4),
        runner("idle-long", Phase::Idle, 0, 300 * S, 4),
        runner("idle-short", Phase::Idle, 0, 90 * S, 4),
        runner("idle-new", Phase::Idle, 0, 5 * S, 4),
    ];
    // Demand 1 (in flight), min 2: two of the four may go, both past keep_alive.
    let k = ScalingKnobs { min_concurrency: 2, ..knobs() };
    let d = autoscale(&load(0, 0, 1), &rs, &k, 100 * S, None);
    assert_eq!(d.desired, 2);
    assert_eq!(d.stop, vec![("idle-long".into(), StopReason::Idle), ("idle-short".into(), StopReason::Idle)]);
    assert!(d.drain.is_empty() && d.start == 0);
}

#[test]
fn lowering_max_drains_busy_runners() {
    let rs = [
        runner("a", Phase::Running, 1, 0, 1),
        runner("b", Phase::Running, 2, 0, 1),
        runner("c", Phase::Idle, 0, 0, 1),
        runner("d", Phase::Starting, 0, 0, 0),
    ];
    let k = ScalingKnobs { max_concurrency: 1, ..knobs() };
    let d = autoscale(&load(5, 0, 3), &rs, &k, 100 * S, None);
    assert_eq!(d.desired, 1);
    assert_eq!(d.stop, vec![("d".into(), StopReason::OverMax), ("c".into(), StopReason::OverMax)]);
    assert_eq!(d.drain, vec!["a".to_string()]);
}

#[test]
fn startup_timeout_stops_slow_starters() {
    let mut slow = runner("slow", Phase::Starting, 0, 0, 0);
    slow.started_at = 100 * S - 31 * S;
    let k = ScalingKnobs { startup_timeout: 30, ..knobs() };
    let d = autoscale(&load(1, 0, 0), &[slow], &k, 100 * S, None);
    assert_eq!(d.stop, vec![("slow".into(), StopReason::StartupTimeout)]);
    // Its place is taken by a fresh start.
    assert_eq!(d.start, 1);
}

#[test]
fn remote_runners_count_but_are_never_stopped() {
    let mut remote = runner("remote", Phase::Idle, 0, 600 * S, 9);
    remote.managed = false;
    let d = autoscale(&load(1, 0, 0), std::slice::from_ref(&remote), &knobs(), 100 * S, None);
    assert_eq!((d.start, d.stop.len()), (0, 0));
    let d = autoscale(&load(0, 0, 0), &[remote], &knobs(), 100 * S, None);
    assert!(d.stop.is_empty());
}

#[test]
fn patch_applies_and_validates() {
    let base = ScalingKnobs::default();
    let p: ScalingPatch = serde_json::from_str(r#"{"min_concurrency": 1, "keep_alive": 5}"#).unwrap();
    let k = p.apply(&base);
    assert_eq!((k.min_concurrency, k.keep_alive, k.max_concurrency), (1, 5, base.max_concurrency));
    assert!(serde_json::from_str::<ScalingPatch>(r#"{"min_concurency": 1}"#).is_err());
    let bad = ScalingKnobs { min_concurrency: 5, max_concurrency: 2, max_multiplexing: 0, ..base };
    let detail = bad.validate(&["body"]).unwrap_err();
    let locs: Vec<_> = detail.iter().map(|d| d["loc"].clone()).collect();
    assert!(locs.contains(&json!(["body", "min_concurrency"])), "{locs:?}");
    assert!(locs.contains(&json!(["body", "max_multiplexing"])), "{locs:?}");
    let merged = p.merge(&ScalingPatch { keep_alive: Some(9), ..Default::default() });
    assert_eq!((merged.min_concurrency, merged.keep_alive), (Some(1), Some(9)));
}

fn inv(cpus: usize, gpus: &[u64]) -> Inventory {
    Inventory {
        cpus: (0..cpus).collect(),
        gpus: gpus.iter().enumerate().map(|(i, mb)| Gpu { index: i as u32, total_mb: *mb, used_mb: 0 }).collect(),
    }
}

fn alloc(runner: &str, app: &str, cpus: &[usize], gpu: Option<(u32, u64)>, idle_since: Option<Millis>) -> Allocation {
    Allocation { runner: runner.into(), app_id: app.into(), cpus: cpus.to_vec(), gpu, idle_since }
}

fn req(app: &str, threads: u32, gpu_mb: u64) -> Request {
    Request { app_id: app.into(), threads, gpu_mb }
}

#[test]
fn cpu_budget_is_never_oversubscribed() {
    let inv = inv(2, &[]);
    assert_eq!(place(&inv, &[], &req("a", 1, 0)), Placement::Fits { cpus: vec![0], gpu: None });
    let a = [alloc("r1", "a", &[0], None, None)];
    assert_eq!(place(&inv, &a, &req("b", 1, 0)), Placement::Fits { cpus: vec![1], gpu: None });
    // Two single-thread runners fill 2 cores: a third waits (both busy).
    let full = [alloc("r1", "a", &[0], None, None), alloc("r2", "b", &[1], None, None)];
    assert_eq!(place(&inv, &full, &req("c", 1, 0)), Placement::Wait);
    // threads 0 reserves nothing (and always fits); more than the budget is clamped to it.
    assert_eq!(place(&inv, &full, &req("c", 0, 0)), Placement::Fits { cpus: vec![], gpu: None });
    assert_eq!(place(&inv, &[], &req("a", 8, 0)), Placement::Fits { cpus: vec![0, 1], gpu: None });
    assert_eq!(place(&inv, &a, &req("b", 8, 0)), Placement::Wait);
}

#[test]
fn gpu_placement_picks_most_free_memory() {
    let mut inv = inv(8, &[24_576, 16_384]);
    assert_eq!(place(&inv, &[], &req("a", 1, 8_000)), Placement::Fits { cpus: vec![0], gpu: Some((0, 8_000)) });
    let a = [alloc("r1", "a", &[0], Some((0, 12_000)), None)];
    // GPU 0 has 12_576 free, GPU 1 16_384: GPU 1.
    assert_eq!(place(&inv, &a, &req("b", 1, 8_000)), Placement::Fits { cpus: vec![1], gpu: Some((1, 8_000)) });
    // Memory used by others counts.
    inv.gpus[1].used_mb = 10_000;
    assert_eq!(place(&inv, &a, &req("b", 1, 8_000)), Placement::Fits { cpus: vec![1], gpu: Some((0, 8_000)) });
    assert!(matches!(place(&inv, &[], &req("huge", 1, 30_000)), Placement::Never(_)));
}

#[test]
fn lru_eviction_frees_the_gpu_for_a_new_app() {
    let inv = inv(8, &[24_576]);
    let allocs = [
        alloc("old", "a", &[0], Some((0, 10_000)), Some(1_000)),
        alloc("recent", "b", &[1], Some((0, 10_000)), Some(5_000)),
        alloc("busy", "c", &[2], None, None),
        alloc("cpu-only-idle", "d", &[3], None, Some(0)),
    ];
    // 4_576 MiB free; 12_000 needs one eviction: the least recently used GPU holder, not the CPU-only one.
    match place(&inv, &allocs, &req("new", 1, 12_000)) {
        Placement::Evict { victims, gpu, .. } => {
            assert_eq!(victims, vec!["old".to_string()]);
            assert_eq!(gpu, Some((0, 12_000)));
        }
        other => panic!("{other:?}"),
    }
    // 20_000 needs both GPU holders gone.
    match place(&inv, &allocs, &req("new", 1, 20_000)) {
        Placement::Evict { victims, .. } => assert_eq!(victims, vec!["old".to_string(), "recent".into()]),
        other => panic!("{other:?}"),
    }
    // Busy runners are never evicted.
    let busy = [alloc("busy", "c", &[0], Some((0, 20_000)), None)];
    assert_eq!(place(&inv, &busy, &req("new", 1, 10_000)), Placement::Wait);
}

#[test]
fn an_app_never_evicts_its_own_runners() {
    let inv = inv(2, &[]);
    let allocs = [alloc("a1", "a", &[0], None, Some(1)), alloc("a2", "a", &[1], None, Some(2))];
    assert_eq!(place(&inv, &allocs, &req("a", 1, 0)), Placement::Wait);
    match place(&inv, &allocs, &req("b", 1, 0)) {
        Placement::Evict { victims, cpus, .. } => assert_eq!((victims, cpus), (vec!["a1".to_string()], vec![0])),
        other => panic!("{other:?}"),
    }
}

#[test]
fn lru_eviction_frees_cores() {
    let inv = inv(2, &[]);
    let allocs = [alloc("a1", "a", &[0, 1], None, Some(50))];
    assert_eq!(
        place(&inv, &allocs, &req("b", 2, 0)),
        Placement::Evict { victims: vec!["a1".into()], cpus: vec![0, 1], gpu: None }
    );
}

#[test]
fn gpu_specs_parse() {
    let g = Inventory::parse_gpus("0:24GiB, 1:16384MiB").unwrap();
    assert_eq!(g[0], Gpu { index: 0, total_mb: 24_576, used_mb: 0 });
    assert_eq!(g[1].total_mb, 16_384);
    assert!(Inventory::parse_gpus("none").unwrap().is_empty());
    assert!(Inventory::parse_gpus("0=24GiB").is_err());
    assert!(Inventory::parse_gpus("0:24XB").is_err());
}

fn phase() -> impl Strategy<Value = Phase> {
    prop_oneof![Just(Phase::Starting), Just(Phase::Idle), Just(Phase::Running), Just(Phase::Draining)]
}

fn runners() -> impl Strategy<Value = Vec<RunnerView>> {
    proptest::collection::vec((phase(), 0u32..4, 0i64..400, 0u64..3, any::<bool>()), 0..10).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (phase, inf, idle, served, managed))| {
                let in_flight = if phase == Phase::Running {
                    inf.max(1)
                } else if phase == Phase::Idle {
                    0
                } else {
                    inf
                };
                RunnerView {
                    id: format!("r{i}"),
                    phase,
                    managed,
                    in_flight,
                    started_at: 100 * S - idle * S,
                    last_active_at: 100 * S - idle * S,
                    served,
                }
            })
            .collect()
    })
}

fn any_knobs() -> impl Strategy<Value = ScalingKnobs> {
    (0u32..4, 1u32..6, 0u32..3, 0u32..150, 0u64..120, 0u64..20, 1u32..5, 1u64..300).prop_map(
        |(min, max, buf, perc, keep, delay, mux, startup)| ScalingKnobs {
            min_concurrency: min.min(max),
            max_concurrency: max,
            concurrency_buffer: buf,
            concurrency_buffer_perc: perc,
            keep_alive: keep,
            scaling_delay: delay,
            max_multiplexing: mux,
            startup_timeout: startup,
            ..ScalingKnobs::default()
        },
    )
}

proptest! {
    #[test]
    fn autoscaler_invariants(
        queued in 0u64..20, waited in 0i64..60, in_flight in 0u64..10,
        rs in runners(), k in any_knobs(), backoff in proptest::option::of(90i64..110),
    ) {
        let now = 100 * S;
        let l = AppLoad { queued, oldest_queued_at: (queued > 0).then_some(now - waited * S), in_flight };
        let d = autoscale(&l, &rs, &k, now, backoff.map(|b| b * S));
        // desired stays within [min, max].
        prop_assert!(d.desired <= k.max_concurrency);
        prop_assert!(d.desired >= k.min_concurrency.min(k.max_concurrency));
        let live = rs.iter().filter(|r| r.phase != Phase::Draining).count() as u32;
        let stopped = d.stop.len() as u32;
        let after = live - stopped - d.drain.len() as u32 + d.start;
        // Never above max_concurrency through our own starts.
        if d.start > 0 {
            prop_assert!(after <= k.max_concurrency);
            prop_assert!(backoff.is_none_or(|b| now >= b * S));
        }
        // Only managed runners are stopped or drained, and each at most once.
        let mut seen = std::collections::HashSet::new();
        for id in d.stop.iter().map(|(id, _)| id).chain(d.drain.iter()) {
            let r = rs.iter().find(|r| &r.id == id).unwrap();
            prop_assert!(r.managed);
            prop_assert!(r.phase != Phase::Draining);
            prop_assert!(seen.insert(id.clone()));
        }
        // A runner with requests is drained, never stopped; idle stops respect keep_alive.
        for (id, why) in &d.stop {
            let r = rs.iter().find(|r| &r.id == id).unwrap();
            prop_assert!(r.in_flight == 0 || r.phase == Phase::Starting);
            if *why == StopReason::Idle {
                let limit = if r.served == 0 { (k.keep_alive as i64 * S).min(FRESH_RUNNER_IDLE_MS) } else { k.keep_alive as i64 * S };
                prop_assert!(now - r.last_active_at >= limit);
            }
        }
        // Work never waits at zero: queued work whose delay passed gets a runner started, unless backing off.
        let delay_passed = waited * S >= k.scaling_delay as i64 * S;
        if queued > 0 && delay_passed && live == 0 && backoff.is_none() {
            prop_assert!(d.start >= 1);
        }
        // Scale-down never goes below what is desired.
        if d.start == 0 && (stopped > 0 || !d.drain.is_empty()) {
            let startup_stops = d.stop.iter().filter(|(_, w)| *w == StopReason::StartupTimeout).count() as u32;
            prop_assert!(live - stopped + startup_stops - d.drain.len() as u32 >= d.desired.min(live));
        }
    }

    #[test]
    fn placement_never_oversubscribes(
        ncpu in 1usize..6, gpus in proptest::collection::vec(1_000u64..40_000, 0..3),
        reqs in proptest::collection::vec((0u32..4, 0u64..20_000, any::<bool>()), 1..12),
    ) {
        let inv = inv(ncpu, &gpus);
        let mut allocs: Vec<Allocation> = Vec::new();
        for (i, (threads, gpu_mb, goes_idle)) in reqs.into_iter().enumerate() {
            let gpu_mb = if gpus.is_empty() { 0 } else { gpu_mb };
            let r = req(&format!("app{i}"), threads, gpu_mb);
            let (cpus, gpu, victims) = match place(&inv, &allocs, &r) {
                Placement::Fits { cpus, gpu } => (cpus, gpu, vec![]),
                Placement::Evict { victims, cpus, gpu } => (cpus, gpu, victims),
                Placement::Wait | Placement::Never(_) => continue,
            };
            for v in &victims {
                let a = allocs.iter().find(|a| &a.runner == v).unwrap();
                prop_assert!(a.idle_since.is_some(), "evicted a busy runner");
                prop_assert!(a.app_id != r.app_id, "evicted its own app's runner");
            }
            allocs.retain(|a| !victims.contains(&a.runner));
            allocs.push(alloc(&format!("r{i}"), &r.app_id, &cpus, gpu, goes_idle.then_some(i as i64)));
            // Cores are never shared and GPUs never over-committed.
            let mut cores: Vec<usize> = allocs.iter().flat_map(|a| a.cpus.clone()).collect();
            let n = cores.len();
            cores.sort();
            cores.dedup();
            prop_assert_eq!(cores.len(), n);
            prop_assert!(n <= ncpu);
            for g in &inv.gpus {
                let used: u64 = allocs.iter().filter_map(|a| a.gpu).filter(|(i, _)| *i == g.index).map(|(_, m)| m).sum();
                prop_assert!(used <= g.total_mb);
            }
        }
    }
}
