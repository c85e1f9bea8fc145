//! The rate limiter on a device's request path: what a consume costs when the request goes, when
//! it is refused, and with no limit; and how close to its configured rate a device loop is held.
//!
//! The cost benchmarks are criterion's. The accuracy is measured once per run, after them: a
//! device loop pushes requests for 10 s against the real clock, waiting on the limiter's timerfd
//! through epoll when refused, and the rate it got is printed with its error against the
//! configured rate. It runs when the benchmark filter is empty or a part of
//! `rate_limiter/accuracy`; under `cargo test` it runs for 200 ms only, as a smoke test.

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group};
use ember_rate_limiter::{
    BucketConfig, Clock, MonotonicClock, RateLimiter, TokenBucket, TokenType,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The size of a network frame, the request the cost benchmarks consume.
const FRAME: u64 = 1500;

/// A bucket that never runs dry under the benchmark: 10^12 bytes per second refills more in the
/// nanoseconds between two consumes than a consume takes, so every consume goes, and every one
/// refills (the bucket is never full when the next consume comes).
const ENDLESS: BucketConfig = BucketConfig {
    size: 1_000_000_000_000,
    one_time_burst: 0,
    refill_time: 1000,
};

/// 1 MB every 100 ms.
const TEN_MB_PER_S: BucketConfig = BucketConfig {
    size: 1_000_000,
    one_time_burst: 0,
    refill_time: 100,
};

fn bench_limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limiter/consume");

    let mut limiter = RateLimiter::new(Some(ENDLESS), None).unwrap();
    group.bench_function("success", |b| {
        b.iter(|| assert!(limiter.consume(black_box(FRAME), TokenType::Bytes)))
    });

    let mut limiter = RateLimiter::unlimited().unwrap();
    group.bench_function("unlimited", |b| {
        b.iter(|| assert!(limiter.consume(black_box(FRAME), TokenType::Bytes)))
    });

    // Refused by the bucket: the limiter blocks and arms its timerfd (one timerfd_settime).
    group.bench_function("refused_arms_timer", |b| {
        b.iter_batched(
            || {
                // A byte per second, spent: the timer is armed for seconds and never fires here.
                let config = BucketConfig {
                    size: FRAME,
                    one_time_burst: 0,
                    refill_time: 1000 * FRAME,
                };
                let mut limiter = RateLimiter::new(Some(config), None).unwrap();
                assert!(limiter.consume(FRAME, TokenType::Bytes));
                limiter
            },
            |mut limiter| {
                assert!(!limiter.consume(black_box(FRAME), TokenType::Bytes));
                limiter
            },
            BatchSize::PerIteration,
        )
    });

    // Refused while blocked: what a device that retries before the timer's event pays.
    let mut limiter = RateLimiter::new(Some(TEN_MB_PER_S), None).unwrap();
    while limiter.consume(FRAME, TokenType::Bytes) {}
    assert!(limiter.is_blocked());
    group.bench_function("refused_blocked", |b| {
        b.iter(|| assert!(!limiter.consume(black_box(FRAME), TokenType::Bytes)))
    });
    group.finish();
}

fn bench_bucket(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limiter/bucket");
    // The clock reading each consume of a limiter starts with.
    group.bench_function("monotonic_clock_now", |b| {
        b.iter(|| black_box(MonotonicClock.now()))
    });
    // The arithmetic alone, on a clock that moves 100 ns per consume: the refill in 64-bit
    // divisions when the products fit, and in 128-bit ones at the extremes.
    let mut bucket = ENDLESS.bucket().unwrap();
    let mut now = 0u64;
    group.bench_function("consume_at", |b| {
        b.iter(|| {
            now += 100;
            black_box(bucket.consume_at(black_box(FRAME), now))
        })
    });
    let mut bucket = TokenBucket::new(u64::MAX, 0, u64::MAX).unwrap();
    let mut now = 0u64;
    group.bench_function("consume_at_u64_max", |b| {
        b.iter(|| {
            now += 100;
            black_box(bucket.consume_at(black_box(FRAME), now))
        })
    });
    group.finish();
}

/// What a device loop got from a limiter over a run.
struct Accuracy {
    bytes: u64,
    elapsed: Duration,
    waits: u64,
    late: Duration,
}

/// Pushes `request`-byte requests through a limiter of `config` for `run`, waiting on its
/// timerfd through epoll when refused, and counts what went.
///
/// The first bucketful is spent before the measurement starts, at a refusal, so what is measured
/// is the refill rate: the bucket held less than one request then. The measurement ends at a
/// refusal too, so it is off by less than a request either way.
fn measure(config: BucketConfig, request: u64, run: Duration) -> Accuracy {
    let mut limiter = RateLimiter::new(Some(config), None).unwrap();
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            limiter.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    let mut wait = |limiter: &mut RateLimiter| {
        let deadline = Instant::now() + limiter.retry_after().unwrap();
        assert_eq!(epoll.wait(1000, &mut events).unwrap(), 1);
        limiter.event_handler().unwrap();
        Instant::now().saturating_duration_since(deadline)
    };

    while limiter.consume(request, TokenType::Bytes) {}
    let start = Instant::now();
    wait(&mut limiter);
    let mut end = start;
    let (mut bytes, mut waits, mut late) = (0, 0, Duration::ZERO);
    while end - start < run {
        if limiter.consume(request, TokenType::Bytes) {
            bytes += request;
            end = Instant::now();
        } else {
            waits += 1;
            late += wait(&mut limiter);
        }
    }
    Accuracy {
        bytes,
        elapsed: end - start,
        waits,
        late,
    }
}

/// Measures and prints the accuracy of a device loop for each configuration.
fn report_accuracy(run: Duration) {
    for (name, config, request) in [
        ("10MBps_1500B", TEN_MB_PER_S, FRAME),
        (
            "100MBps_64KiB",
            BucketConfig {
                size: 10_000_000,
                one_time_burst: 0,
                refill_time: 100,
            },
            64 << 10,
        ),
    ] {
        let rate = config.size as f64 * 1000.0 / config.refill_time as f64;
        let result = measure(config, request, run);
        let measured = result.bytes as f64 / result.elapsed.as_secs_f64();
        let error = (measured - rate) / rate * 100.0;
        let late = result.late / u32::try_from(result.waits.max(1)).unwrap_or(u32::MAX);
        println!(
            "rate_limiter/accuracy/{name}: {} bytes in {:.6} s = {:.6} MB/s against {:.6} MB/s, \
             error {error:+.4} %; {} waits on the timerfd, woken {:.1} us after the deadline on \
             average",
            result.bytes,
            result.elapsed.as_secs_f64(),
            measured / 1e6,
            rate / 1e6,
            result.waits,
            late.as_secs_f64() * 1e6,
        );
    }
}

/// How long the accuracy runs, or `None` when the benchmark filter leaves it out.
fn accuracy_run() -> Option<Duration> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filters = args.iter().filter(|arg| !arg.starts_with('-')).peekable();
    let selected = filters.peek().is_none()
        || filters.any(|filter| "rate_limiter/accuracy".contains(filter.as_str()));
    let bench = args.iter().any(|arg| arg == "--bench");
    selected.then_some(if bench {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(200)
    })
}

criterion_group!(benches, bench_limiter, bench_bucket);

fn main() {
    benches();
    if let Some(run) = accuracy_run() {
        report_accuracy(run);
    }
    Criterion::default().configure_from_args().final_summary();
}
