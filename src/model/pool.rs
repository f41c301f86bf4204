//! Worker threads that stay awake between the matrix products of a forward pass.
//!
//! Why not rayon here: one decode step is ~100 small parallel products (four per
//! layer plus the head) separated by microseconds of serial work (norms, RoPE,
//! attention). rayon's idle workers go to sleep within that gap, so every product
//! paid a futex wake-up: about a fifth of SmolLM2's decode time. These workers spin
//! on an epoch counter for a while after each job (as llama.cpp's graph threads
//! do, with one barrier per product) and only park when the model is idle.
//!
//! The pool is a process-wide singleton sized like rayon's (`RAYON_NUM_THREADS`,
//! which `--threads` sets). Jobs from several threads are serialised: each job
//! already uses every core.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks: longer than the serial gaps
/// of a forward pass, short enough that an idle server does not burn a core.
const SPIN: Duration = Duration::from_micros(500);

/// One parallel job: `tasks` calls of `f`, each with its own index.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    /// Bumped (after `job`, `next` and `finished` are set) to publish a job.
    epoch: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    next: AtomicUsize,
    /// Workers that are done with the current epoch's job.
    finished: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct HotPool {
    shared: Arc<Shared>,
    workers: usize,
    submit: Mutex<()>,
}

impl HotPool {
    /// The process-wide pool, started on first use with rayon's thread count.
    pub fn global() -> &'static HotPool {
        static POOL: OnceLock<HotPool> = OnceLock::new();
        POOL.get_or_init(|| HotPool::new(rayon::current_num_threads().max(1)))
    }

    /// A pool running jobs on `threads` threads: the caller's plus `threads - 1`
    /// workers (which live as long as the process).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = threads.saturating_sub(1);
        for i in 0..workers {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("claw-matmul-{i}"))
                .spawn(move || worker(&shared))
                .expect("cannot start a matmul worker thread");
        }
        Self {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Calls `f(0..tasks)` spread over the pool's threads (the caller's included)
    /// and returns when every call has returned. A panic in `f` is re-raised here.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers == 0 || tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _one_job_at_a_time = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        let job = Job { f, tasks };
        // SAFETY (lifetime erasure): workers dereference `job` only between seeing
        // this epoch and incrementing `finished`, and this function does not return
        // (so `job` and `f` outlive every use) until all workers have incremented it.
        let erased = &job as *const Job<'_> as *mut Job<'static>;
        shared.job.store(erased, Ordering::Relaxed);
        shared.next.store(0, Ordering::Relaxed);
        shared.finished.store(0, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| run_tasks(shared, &job)));
        let mut spins = 0u32;
        while shared.finished.load(Ordering::Acquire) < self.workers {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1 << 16) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        let worker_panicked = shared.panicked.swap(false, Ordering::AcqRel);
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if worker_panicked {
            panic!("a matmul worker thread panicked");
        }
    }
}

fn run_tasks(shared: &Shared, job: &Job<'_>) {
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            return;
        }
        (job.f)(i);
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        seen = wait_for_job(shared, seen);
        // SAFETY: the submitter published a live job before bumping the epoch
        // (SeqCst), and keeps it alive until this worker increments `finished`.
        let job = unsafe { &*shared.job.load(Ordering::Acquire) };
        if catch_unwind(AssertUnwindSafe(|| run_tasks(shared, job))).is_err() {
            shared.panicked.store(true, Ordering::Release);
        }
        shared.finished.fetch_add(1, Ordering::AcqRel);
    }
}

/// Spins until the epoch moves past `seen`, parking after [`SPIN`] without work.
fn wait_for_job(shared: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            return epoch;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(256) && start.elapsed() > SPIN {
            break;
        }
        std::hint::spin_loop();
    }
    let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            return epoch;
        }
        guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
    }
}

/// A pointer to a buffer that parallel tasks fill in disjoint parts.
#[derive(Clone, Copy)]
pub struct SharedOut<T>(*mut T, usize);

// SAFETY: a SharedOut only hands out disjoint ranges (see `range`, and `ptr`'s
// callers), so tasks on different threads never touch the same element.
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    pub fn new(buffer: &mut [T]) -> Self {
        Self(buffer.as_mut_ptr(), buffer.len())
    }

    /// The buffer's first element, for tasks whose parts are not contiguous
    /// (columns of a row-major matrix); each such use argues its disjointness.
    pub fn ptr(&self) -> *mut T {
        self.0
    }

    /// Elements `start..end` of the buffer.
    ///
    /// # Safety
    /// The buffer must outlive the use, and no two live ranges may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, start: usize, end: usize) -> &mut [T] {
        assert!(
            start <= end && end <= self.1,
            "range {start}..{end} of {}",
            self.1
        );
        std::slice::from_raw_parts_mut(self.0.add(start), end - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_job_across_many_jobs() {
        let pool = HotPool::new(3);
        for tasks in [0, 1, 2, 7, 100] {
            for _ in 0..50 {
                let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(tasks, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn workers_wake_up_after_parking() {
        let pool = HotPool::new(2);
        std::thread::sleep(SPIN * 4);
        let total = AtomicUsize::new(0);
        pool.run(64, &|i| {
            total.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 63 * 64 / 2);
    }

    #[test]
    fn jobs_from_several_threads_are_serialised() {
        let pool = Arc::new(HotPool::new(2));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let mut out = vec![0usize; 32];
                        let shared = SharedOut::new(&mut out);
                        pool.run(8, &|t| {
                            // SAFETY: task t writes only its own four elements.
                            let part = unsafe { shared.range(t * 4, t * 4 + 4) };
                            part.iter_mut().for_each(|v| *v = t);
                        });
                        assert!(out.iter().enumerate().all(|(i, &v)| v == i / 4));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller() {
        let pool = HotPool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, &|i| assert!(i != 9, "task 9 fails"));
        }));
        assert!(result.is_err());
        // The pool still works afterwards.
        let total = AtomicUsize::new(0);
        pool.run(4, &|_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 4);
    }
}
