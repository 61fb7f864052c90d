//! Fork-join for the kernels: the calling thread and up to `threads − 1` helper threads share
//! a job's tasks, claiming them one at a time from a shared counter.
//!
//! Why not rayon's pool: a decoding model calls a layer every 10–100 µs, with a few µs of
//! serial work in between. Rayon's idle workers go to sleep within tens of µs, and waking one
//! costs about 10 µs on a virtual machine — more than half of what splitting a small layer
//! saves. These helpers spin for [`SPIN`] after each job before they park, so the next layer
//! finds them awake; after a longer pause they cost nothing.
//!
//! Helper `h` starts a job with task `h + 1` (the caller with task 0): a layer split in as many
//! tasks as threads gives each thread the same weights on every call, still warm in that
//! core's cache. A caller that has run out of tasks takes a helper's first task itself if the
//! helper has not begun it, so a helper that is slow to wake (parked, or its core lent to
//! another thread for a while) never makes a call slower than running it alone; the caller
//! only waits for tasks a helper has begun.
//!
//! One caller leads at a time; a call that finds the team busy (another thread is running a
//! kernel) does its tasks on its own thread — the cores are busy anyway.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling for the next job before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// Most helpers a job uses (one bit each in [`Job::first_taken`]).
const MAX_HELPERS: usize = 64;

/// One fork-join job: `tasks` calls of `work`. Task 0 is the leader's; task `h + 1` is helper
/// `h`'s first, unless the leader takes it first (a helper that is slow to wake — parked, or
/// its core busy with another process — then costs nothing); every other task is claimed from
/// `next` by whoever comes.
struct Job {
    next: AtomicUsize,
    tasks: usize,
    /// Bit `h`: helper `h`'s first task has been taken (by `h` or by the leader).
    first_taken: AtomicU64,
    /// Tasks finished (or panicked): the leader returns when all are.
    done: AtomicUsize,
    panicked: AtomicBool,
    /// The caller's closure, its lifetime erased: called only for a claimed task, and every
    /// task is claimed and finished before the leader returns (after which no claim succeeds).
    work: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `work` points at a `Sync` closure and is only called while the leader waits for the
// job (see the field); the rest are atomics.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    fn run_task(&self, i: usize) {
        // SAFETY: the caller claimed task `i`, so the leader is still waiting for it to finish
        // and the closure is alive.
        let work = unsafe { &*self.work };
        if catch_unwind(AssertUnwindSafe(|| work(i))).is_err() {
            self.panicked.store(true, Ordering::Relaxed);
        }
        // Release: the task's writes are visible to the leader once it sees the count.
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Claims helper `h`'s first task, `h + 1`, if nobody has.
    fn take_first(&self, h: usize) -> bool {
        h + 1 < self.tasks && self.first_taken.fetch_or(1 << h, Ordering::AcqRel) & (1 << h) == 0
    }

    /// Claims and runs tasks from `next` until none are left.
    fn run_rest(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            self.run_task(i);
        }
    }
}

/// A helper's mailbox: the leader puts a job in `job` and bumps `posted`.
struct Slot {
    /// This helper's place in the team (0-based); it starts each job with task `index + 1`.
    index: usize,
    posted: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    parked: AtomicBool,
    thread: OnceLock<Thread>,
}

/// The helpers; the lock is held by the leader for a whole job.
static TEAM: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());

/// Runs `work(0..tasks)` on the calling thread and up to `threads − 1` helpers (never more
/// threads than the machine has cores: a spinning helper must not take a core from a working
/// one), returning when every task has finished. A panic in any task is re-raised here, after
/// all tasks are done.
pub fn run(tasks: usize, threads: usize, work: &(dyn Fn(usize) + Sync)) {
    static CORES: OnceLock<usize> = OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let wanted = threads.min(tasks).min(cores).saturating_sub(1).min(MAX_HELPERS);
    let team = if wanted > 0 { TEAM.try_lock().ok() } else { None };
    let Some(mut slots) = team else {
        // Alone (no helpers wanted, or the team is busy): every task still runs before a panic
        // is passed on, as on the team.
        let mut panicked = None;
        for i in 0..tasks {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| work(i))) {
                panicked.get_or_insert(p);
            }
        }
        if let Some(p) = panicked {
            std::panic::resume_unwind(p);
        }
        return;
    };
    while slots.len() < wanted {
        match spawn_helper(slots.len()) {
            Some(slot) => slots.push(slot),
            None => break, // no more threads: run with the helpers there are
        }
    }
    let helpers = &slots[..wanted.min(slots.len())];
    // SAFETY: only the lifetime is erased; `Job::work` says why the closure outlives its uses.
    let work: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work as *const (dyn Fn(usize) + Sync + '_)) };
    let job = Arc::new(Job {
        next: AtomicUsize::new(helpers.len() + 1),
        tasks,
        first_taken: AtomicU64::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        work,
    });
    for slot in helpers {
        if let Ok(mut mailbox) = slot.job.lock() {
            *mailbox = Some(Arc::clone(&job));
        }
        slot.posted.fetch_add(1, Ordering::SeqCst);
        if slot.parked.load(Ordering::SeqCst) {
            if let Some(t) = slot.thread.get() {
                t.unpark();
            }
        }
    }
    job.run_task(0);
    job.run_rest();
    for h in 0..helpers.len() {
        if job.take_first(h) {
            job.run_task(h + 1);
        }
    }
    // Every task is claimed now; wait for the ones still running on helpers.
    let (start, mut polls) = (Instant::now(), 0u32);
    while job.done.load(Ordering::Acquire) < tasks {
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(256) && start.elapsed() > SPIN {
            std::thread::yield_now(); // the helper was descheduled: give it the core
        } else {
            std::hint::spin_loop();
        }
    }
    drop(slots);
    if job.panicked.load(Ordering::Relaxed) {
        panic!("an int8 kernel task panicked");
    }
}

fn spawn_helper(index: usize) -> Option<Arc<Slot>> {
    let slot =
        Arc::new(Slot { index, posted: AtomicU64::new(0), job: Mutex::new(None), parked: AtomicBool::new(false), thread: OnceLock::new() });
    let mine = Arc::clone(&slot);
    let handle = std::thread::Builder::new().name("candle-quant-kernel".into()).spawn(move || helper(&mine)).ok()?;
    let _ = slot.thread.set(handle.thread().clone());
    Some(slot)
}

/// A helper's life: wait for the next posted job (spinning for [`SPIN`], then parked), take
/// its first task unless the leader did, then claim tasks until none are left.
fn helper(slot: &Slot) {
    let mut seen = 0u64;
    loop {
        let mut idle_since = Instant::now();
        let mut polls = 0u32;
        loop {
            if slot.posted.load(Ordering::Acquire) != seen {
                break;
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(256) && idle_since.elapsed() > SPIN {
                // Park unless a job came in meanwhile; the leader unparks us if it sees
                // `parked` (SeqCst on both sides: one of us sees the other's store).
                slot.parked.store(true, Ordering::SeqCst);
                if slot.posted.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                slot.parked.store(false, Ordering::SeqCst);
                idle_since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
        seen = slot.posted.load(Ordering::Acquire);
        // The latest job (a job posted before it is finished already, or finishes without us).
        let job = slot.job.lock().ok().and_then(|j| j.clone());
        if let Some(job) = job {
            if job.take_first(slot.index) {
                job.run_task(slot.index + 1);
            }
            job.run_rest();
        }
    }
}

/// Threads for a team job: candle's thread count (rayon's, `RAYON_NUM_THREADS`) when the work
/// is worth splitting, else the calling thread alone.
pub(super) fn team_threads(parallel: bool) -> usize {
    if parallel {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// Runs `work(i, &mut items[i])` for every item on `threads` threads of the kernel team, each
/// item handed to exactly one task.
pub(super) fn run_on_items<P: Send>(items: Vec<P>, threads: usize, work: impl Fn(usize, &mut P) + Sync) {
    let items: Vec<_> = items.into_iter().map(std::sync::Mutex::new).collect();
    run(items.len(), threads, &|i| {
        // Each task locks only its own item (never contended); a panic in `work` poisons that
        // item alone and team::run re-raises it once every task has finished.
        if let Ok(mut item) = items[i].lock() {
            work(i, &mut item)
        }
    })
}

/// Runs `work(i, parts[i])` for every part on `threads` threads of the kernel team, each part
/// handed to exactly one task.
pub(super) fn run_on_parts<T: Send>(parts: Vec<&mut [T]>, threads: usize, work: impl Fn(usize, &mut [T]) + Sync) {
    run_on_items(parts, threads, |i, part| work(i, part))
}

/// Runs `work(i, parts[i])` for every part on the kernels' fork-join team — as many threads as
/// candle's CPU ops use — or on the calling thread when `parallel` is false. For other small,
/// latency-bound steps of a decoding model that run between int8 layers (the team is awake
/// then).
pub(crate) fn parallel_for_parts<T: Send>(parts: Vec<&mut [T]>, parallel: bool, work: impl Fn(usize, &mut [T]) + Sync) {
    run_on_parts(parts, team_threads(parallel), work)
}

/// [`parallel_for_parts`] for work that can fail: every part runs, then the first error one
/// of them returned (if any) is returned.
pub(crate) fn try_parallel_for_parts<T: Send>(
    parts: Vec<&mut [T]>,
    parallel: bool,
    work: impl Fn(usize, &mut [T]) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<()> {
    let failed = std::sync::Mutex::new(None);
    parallel_for_parts(parts, parallel, |i, part| {
        if let Err(e) = work(i, part) {
            if let Ok(mut f) = failed.lock() {
                f.get_or_insert(e);
            }
        }
    });
    failed.into_inner().ok().flatten().map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_any_team_size() {
        for threads in [1, 2, 3, 8] {
            for tasks in [0, 1, 2, 5, 64] {
                let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                run(tasks, threads, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "{threads} threads, {tasks} tasks");
            }
        }
    }

    #[test]
    fn concurrent_callers_and_parked_helpers() {
        std::thread::scope(|s| {
            for caller in 0..4 {
                s.spawn(move || {
                    for round in 0..200 {
                        let sum = AtomicUsize::new(0);
                        run(16, 3, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 120, "caller {caller} round {round}");
                        if round % 50 == 0 {
                            std::thread::sleep(SPIN * 3); // let the helpers park
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_others_finish() {
        // On the team, and on a caller running alone (one thread; or the team busy elsewhere).
        for threads in [2, 1] {
            let done = AtomicUsize::new(0);
            let result = catch_unwind(AssertUnwindSafe(|| {
                run(8, threads, &|i| {
                    if i == 3 {
                        panic!("task 3");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                })
            }));
            assert!(result.is_err(), "{threads} threads");
            assert_eq!(done.load(Ordering::Relaxed), 7, "{threads} threads");
        }
        // The team is usable afterwards.
        let sum = AtomicUsize::new(0);
        run(4, 2, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }
}
