//! Fork-join for the kernels: the calling thread and up to `threads − 1` helper threads share
//! a job's tasks, claiming them one at a time from a shared counter.
//!
//! Why not rayon's pool: a decoding model calls a layer every 10–100 µs, with a few µs of
//! serial work in between. Rayon's idle workers go to sleep within tens of µs, and waking one
//! costs about 10 µs on a VM (measured on the 2-core dev VM: a 10 µs job split in two with
//! `rayon::join` took 7.6 µs back to back but 17 µs after a 50 µs pause) — more than half of
//! what splitting a small layer saves. These helpers spin for [`SPIN`] after each job before
//! they park, so the next layer finds them awake (576×576 layers streamed from memory, one
//! call every 100 µs, 2 threads: 32.5 µs per call here vs 44.0 µs on rayon, 48.8 µs on one
//! thread); after a longer pause they cost nothing.
//!
//! Helper `h` always starts a job with task `h + 1` (the caller with task 0): a layer split
//! in as many tasks as threads gives each thread the same weights on every call, still warm in
//! that core's cache.
//!
//! One caller leads at a time; a call that finds the team busy (another thread is running a
//! kernel) does its tasks on its own thread — the cores are busy anyway.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling for the next job before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// One fork-join job: `tasks` calls of `work`, indices claimed from `next`.
struct Job<'a> {
    next: AtomicUsize,
    tasks: usize,
    work: &'a (dyn Fn(usize) + Sync),
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Runs task `first` (participant `p` of `P` starts with task `p`, so that a layer called
    /// again gives each thread the same weights, still in its own cache), then claims and runs
    /// tasks from `next` (which starts at `P`) until none are left. A panicking task is
    /// recorded, not unwound: the leader must not return while a helper still uses the job.
    fn work_through(&self, first: usize) {
        let mut i = first;
        while i < self.tasks {
            if catch_unwind(AssertUnwindSafe(|| (self.work)(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            i = self.next.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A helper's mailbox: the leader posts job number `posted` (pointing `job` at it); the helper
/// sets `finished` to that number once it has stopped touching the job.
struct Slot {
    /// This helper's place in the team (0-based); it starts each job with task `index + 1`.
    index: usize,
    posted: AtomicU64,
    finished: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    parked: AtomicBool,
    thread: OnceLock<Thread>,
}

/// The helpers; the lock is held by the leader for a whole job.
static TEAM: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());

/// Runs `work(0..tasks)` on the calling thread and up to `threads − 1` helpers (never more
/// threads than the machine has cores: a spinning helper must not take a core from a working
/// one), returning when every task has finished. A panic in any task is re-raised here, after
/// all helpers are done.
pub fn run(tasks: usize, threads: usize, work: &(dyn Fn(usize) + Sync)) {
    static CORES: OnceLock<usize> = OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let wanted = threads.min(tasks).min(cores).saturating_sub(1);
    let team = if wanted > 0 { TEAM.try_lock().ok() } else { None };
    let Some(mut slots) = team else {
        (0..tasks).for_each(work);
        return;
    };
    while slots.len() < wanted {
        match spawn_helper(slots.len()) {
            Some(slot) => slots.push(slot),
            None => break, // no more threads: run with the helpers there are
        }
    }
    let helpers = &slots[..wanted.min(slots.len())];
    let job = Job { next: AtomicUsize::new(helpers.len() + 1), tasks, work, panicked: AtomicBool::new(false) };
    // The helpers see the job through a pointer whose lifetime is erased; they stop using it
    // before they publish `finished`, and we wait for that below before `job` goes away.
    let pointer = (&job as *const Job<'_>).cast_mut().cast::<Job<'static>>();
    for slot in helpers {
        slot.job.store(pointer, Ordering::Release);
        slot.posted.fetch_add(1, Ordering::SeqCst);
        if slot.parked.load(Ordering::SeqCst) {
            if let Some(t) = slot.thread.get() {
                t.unpark();
            }
        }
    }
    job.work_through(0);
    for slot in helpers {
        let target = slot.posted.load(Ordering::Relaxed);
        let (start, mut polls) = (Instant::now(), 0u32);
        while slot.finished.load(Ordering::Acquire) != target {
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(256) && start.elapsed() > SPIN {
                std::thread::yield_now(); // the helper was descheduled: give it the core
            } else {
                std::hint::spin_loop();
            }
        }
    }
    drop(slots);
    if job.panicked.load(Ordering::Relaxed) {
        panic!("an int8 kernel task panicked");
    }
}

fn spawn_helper(index: usize) -> Option<Arc<Slot>> {
    let slot = Arc::new(Slot {
        index,
        posted: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        job: AtomicPtr::new(std::ptr::null_mut()),
        parked: AtomicBool::new(false),
        thread: OnceLock::new(),
    });
    let mine = Arc::clone(&slot);
    let handle = std::thread::Builder::new().name("candle-quant-kernel".into()).spawn(move || helper(&mine)).ok()?;
    let _ = slot.thread.set(handle.thread().clone());
    Some(slot)
}

/// A helper's life: wait for the next posted job (spinning for [`SPIN`], then parked), work
/// through it, report it finished.
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
        let job = slot.job.load(Ordering::Acquire);
        // SAFETY: the leader stored `job` before posting `seen` and keeps the job alive until
        // we publish `finished = seen` below; we do not touch it after that.
        unsafe { &*job }.work_through(slot.index + 1);
        slot.finished.store(seen, Ordering::Release);
    }
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
        let done = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            run(8, 2, &|i| {
                if i == 3 {
                    panic!("task 3");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(result.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 7);
        // The team is usable afterwards.
        let sum = AtomicUsize::new(0);
        run(4, 2, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }
}
