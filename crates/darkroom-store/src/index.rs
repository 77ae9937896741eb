//! The in-memory index of active (queued and running) jobs, kept by the SQLite store's writer.
//!
//! Every write that changes a job's state updates the index after its transaction commits, so status polls, queue
//! positions, queue lengths and per-key counts never touch the database. The writer also rebuilds the index from the
//! database now and then (and at start), which would repair any transition it missed; a repair is logged.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use darkroom_core::Millis;
use darkroom_core::job::{JobRecord, JobState};

use crate::AppDepth;

/// What the index knows about one active job: enough to answer a status poll without the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobBrief {
    pub id: String,
    pub app_id: String,
    pub owner_id: String,
    pub key_id: String,
    pub priority: i64,
    pub seq: i64,
    pub created_at: Millis,
    /// Queued or Running (completed jobs leave the index).
    pub state: JobState,
    pub runner_hint: Option<String>,
    pub cold_start_ms: Option<i64>,
}

impl JobBrief {
    pub fn of(r: &JobRecord) -> JobBrief {
        JobBrief {
            id: r.id.clone(),
            app_id: r.app_id.clone(),
            owner_id: r.owner_id.clone(),
            key_id: r.key_id.clone(),
            priority: r.priority,
            seq: r.seq,
            created_at: r.created_at,
            state: r.state,
            runner_hint: r.runner_hint.clone(),
            cold_start_ms: r.cold_start_ms,
        }
    }

    fn order(&self) -> (Reverse<i64>, i64) {
        (Reverse(self.priority), self.seq)
    }
}

#[derive(Debug, Default)]
pub struct Index {
    jobs: HashMap<String, JobBrief>,
    /// Per app, its queued jobs in dispatch order (higher priority first, then FIFO).
    queues: HashMap<String, BTreeMap<(Reverse<i64>, i64), String>>,
    /// Per app, its queued jobs by submit time: the oldest without a walk of the queue (depths are read on every
    /// fleet tick).
    ages: HashMap<String, BTreeSet<(Millis, i64)>>,
    running: HashMap<String, i64>,
    key_active: HashMap<String, i64>,
    /// Per key, how many of its jobs are queued at each priority.
    key_queued: HashMap<String, BTreeMap<i64, i64>>,
}

fn bump<K: std::hash::Hash + Eq + Clone>(m: &mut HashMap<K, i64>, k: &K, by: i64) {
    let v = m.entry(k.clone()).or_insert(0);
    *v += by;
    if *v <= 0 {
        m.remove(k);
    }
}

impl Index {
    pub fn from_records(records: impl IntoIterator<Item = JobBrief>) -> Index {
        let mut ix = Index::default();
        for b in records {
            ix.put(b);
        }
        ix
    }

    fn detach(&mut self, id: &str) -> Option<JobBrief> {
        let b = self.jobs.remove(id)?;
        bump(&mut self.key_active, &b.key_id, -1);
        match b.state {
            JobState::Queued => {
                if let Some(q) = self.queues.get_mut(&b.app_id) {
                    q.remove(&b.order());
                    if q.is_empty() {
                        self.queues.remove(&b.app_id);
                    }
                }
                if let Some(a) = self.ages.get_mut(&b.app_id) {
                    a.remove(&(b.created_at, b.seq));
                    if a.is_empty() {
                        self.ages.remove(&b.app_id);
                    }
                }
                if let Some(k) = self.key_queued.get_mut(&b.key_id) {
                    if let Some(n) = k.get_mut(&b.priority) {
                        *n -= 1;
                        if *n <= 0 {
                            k.remove(&b.priority);
                        }
                    }
                    if k.is_empty() {
                        self.key_queued.remove(&b.key_id);
                    }
                }
            }
            _ => bump(&mut self.running, &b.app_id, -1),
        }
        Some(b)
    }

    fn put(&mut self, b: JobBrief) {
        self.detach(&b.id);
        match b.state {
            JobState::Completed => return,
            JobState::Queued => {
                self.queues.entry(b.app_id.clone()).or_default().insert(b.order(), b.id.clone());
                self.ages.entry(b.app_id.clone()).or_default().insert((b.created_at, b.seq));
                *self.key_queued.entry(b.key_id.clone()).or_default().entry(b.priority).or_insert(0) += 1;
            }
            _ => bump(&mut self.running, &b.app_id, 1),
        }
        bump(&mut self.key_active, &b.key_id, 1);
        self.jobs.insert(b.id.clone(), b);
    }

    /// A job as it now is in the database (completed jobs leave the index).
    pub fn record(&mut self, r: &JobRecord) {
        let mut b = JobBrief::of(r);
        // A record read before its cold start was noted keeps the noted one.
        if b.cold_start_ms.is_none()
            && let Some(old) = self.jobs.get(&r.id)
            && old.state == JobState::Running
            && r.state == JobState::Running
        {
            b.cold_start_ms = old.cold_start_ms;
        }
        self.put(b);
    }

    pub fn remove(&mut self, id: &str) {
        self.detach(id);
    }

    /// A claim found the job no longer queued: if the index still had it queued, it leaves.
    pub fn forget_queued(&mut self, id: &str) {
        if self.jobs.get(id).is_some_and(|b| b.state == JobState::Queued) {
            self.detach(id);
        }
    }

    /// The job went back to the queue for another attempt.
    pub fn requeue(&mut self, id: &str) {
        if let Some(mut b) = self.detach(id) {
            b.state = JobState::Queued;
            b.cold_start_ms = None;
            self.put(b);
        }
    }

    pub fn set_cold_start(&mut self, id: &str, ms: i64) {
        if let Some(b) = self.jobs.get_mut(id) {
            b.cold_start_ms = Some(ms);
        }
    }

    pub fn get(&self, id: &str) -> Option<&JobBrief> {
        self.jobs.get(id)
    }

    /// How many queued jobs of the same app run before this one (None unless it is queued).
    pub fn position(&self, id: &str) -> Option<i64> {
        let b = self.jobs.get(id).filter(|b| b.state == JobState::Queued)?;
        let q = self.queues.get(&b.app_id)?;
        // Counted from whichever end is nearer (both walked in step): a request just submitted is at the tail, so
        // a submit's answer costs O(1) however long the queue, and a poll O(min(ahead, behind)).
        let (mut ahead, mut behind) = (q.range(..b.order()), q.range(b.order()..));
        let mut n = 0usize;
        loop {
            if ahead.next().is_none() {
                return Some(n as i64);
            }
            if behind.next().is_none() {
                // `behind` held n entries, this one included.
                return Some((q.len() - n) as i64);
            }
            n += 1;
        }
    }

    pub fn queued(&self, app_id: &str) -> i64 {
        self.queues.get(app_id).map_or(0, |q| q.len() as i64)
    }

    pub fn active_for_key(&self, key_id: &str) -> i64 {
        self.key_active.get(key_id).copied().unwrap_or(0)
    }

    pub fn queued_for_key(&self, key_id: &str, min_priority: i64) -> i64 {
        self.key_queued.get(key_id).map_or(0, |k| k.range(min_priority..).map(|(_, n)| n).sum())
    }

    /// The first `n` queued jobs of an app in dispatch order, with their runner hints.
    pub fn next_queued(&self, app_id: &str, n: usize) -> Vec<(String, Option<String>)> {
        let Some(q) = self.queues.get(app_id) else { return Vec::new() };
        q.values().take(n).map(|id| (id.clone(), self.jobs.get(id).and_then(|b| b.runner_hint.clone()))).collect()
    }

    pub fn depths(&self) -> Vec<AppDepth> {
        let mut apps: BTreeMap<&str, AppDepth> = BTreeMap::new();
        for (app, q) in &self.queues {
            let d = apps.entry(app).or_insert_with(|| AppDepth { app_id: app.clone(), ..Default::default() });
            d.queued = q.len() as i64;
            d.oldest_queued_at = self.ages.get(app).and_then(|a| a.first()).map(|(t, _)| *t);
        }
        for (app, n) in &self.running {
            apps.entry(app).or_insert_with(|| AppDepth { app_id: app.clone(), ..Default::default() }).running = *n;
        }
        apps.into_values().collect()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether two indexes hold the same jobs in the same states (cold start times aside).
    pub fn same_as(&self, other: &Index) -> bool {
        self.jobs.len() == other.jobs.len()
            && self.jobs.iter().all(|(id, b)| {
                other.jobs.get(id).is_some_and(|o| o.state == b.state && o.priority == b.priority && o.seq == b.seq)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brief(id: &str, app: &str, key: &str, prio: i64, seq: i64, state: JobState) -> JobBrief {
        JobBrief {
            id: id.into(),
            app_id: app.into(),
            owner_id: "o".into(),
            key_id: key.into(),
            priority: prio,
            seq,
            created_at: seq * 10,
            state,
            runner_hint: None,
            cold_start_ms: None,
        }
    }

    #[test]
    fn positions_counts_and_transitions() {
        let mut ix = Index::from_records([
            brief("a", "app", "k1", 0, 1, JobState::Queued),
            brief("b", "app", "k1", 0, 2, JobState::Queued),
            brief("c", "app", "k2", 5, 3, JobState::Queued),
            brief("d", "other", "k2", 0, 4, JobState::Running),
        ]);
        assert_eq!(ix.position("c"), Some(0));
        assert_eq!(ix.position("a"), Some(1));
        assert_eq!(ix.position("b"), Some(2));
        assert_eq!(ix.position("d"), None);
        assert_eq!(ix.queued("app"), 3);
        assert_eq!(ix.active_for_key("k2"), 2);
        assert_eq!(ix.queued_for_key("k1", 0), 2);
        assert_eq!(ix.queued_for_key("k2", 1), 1);
        assert_eq!(ix.next_queued("app", 2).into_iter().map(|x| x.0).collect::<Vec<_>>(), ["c", "a"]);

        // c starts, a is cancelled, c fails and is requeued behind nothing of higher priority.
        let mut c = ix.get("c").unwrap().clone();
        c.state = JobState::Running;
        ix.put(c);
        ix.set_cold_start("c", 40);
        assert_eq!(ix.get("c").unwrap().cold_start_ms, Some(40));
        assert_eq!(ix.position("a"), Some(0));
        ix.remove("a");
        assert_eq!(ix.position("b"), Some(0));
        assert_eq!(ix.active_for_key("k1"), 1);
        ix.requeue("c");
        assert_eq!(ix.position("c"), Some(0));
        assert_eq!(ix.position("b"), Some(1));
        assert_eq!(ix.get("c").unwrap().cold_start_ms, None);

        let depths = ix.depths();
        assert_eq!(depths.len(), 2);
        assert_eq!((depths[0].app_id.as_str(), depths[0].queued, depths[0].running), ("app", 2, 0));
        assert_eq!(depths[0].oldest_queued_at, Some(20));
        assert_eq!((depths[1].app_id.as_str(), depths[1].queued, depths[1].running), ("other", 0, 1));

        ix.remove("b");
        ix.remove("c");
        ix.remove("d");
        ix.remove("nope");
        assert_eq!(ix.len(), 0);
        assert!(ix.queues.is_empty() && ix.ages.is_empty() && ix.running.is_empty() && ix.key_active.is_empty());
        assert!(ix.key_queued.is_empty());
    }

    #[test]
    fn positions_are_counted_from_either_end() {
        // Three priorities interleaved, 301 jobs: every position equals a count of the jobs ahead.
        let jobs: Vec<JobBrief> = (0..301)
            .map(|i| brief(&format!("j{i}"), "app", "k", [0, 5, -3][i as usize % 3], i, JobState::Queued))
            .collect();
        let mut ix = Index::from_records(jobs.clone());
        for j in &jobs {
            let ahead = jobs.iter().filter(|o| o.order() < j.order()).count() as i64;
            assert_eq!(ix.position(&j.id), Some(ahead), "{}", j.id);
        }
        // The oldest queued job by submit time, whatever its priority, as jobs leave and come back.
        let oldest = |ix: &Index| ix.depths()[0].oldest_queued_at;
        assert_eq!(oldest(&ix), Some(0));
        ix.remove("j0");
        assert_eq!(oldest(&ix), Some(10));
        let mut late = brief("late", "app", "k", 9, 400, JobState::Queued);
        late.created_at = 5;
        ix.put(late);
        assert_eq!(oldest(&ix), Some(5));
        for i in 1..301 {
            ix.remove(&format!("j{i}"));
        }
        assert_eq!(oldest(&ix), Some(5));
        ix.remove("late");
        assert!(ix.depths().is_empty() && ix.ages.is_empty());
    }
}
