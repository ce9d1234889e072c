//! What the benchmark programs (count_bench, exchange_bench, worst_shapes) share: medians, and
//! the cache eviction between timed runs. Included with `#[path]` (not a program of its own).

use std::time::Instant;

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Memory written before a timed run so that it starts with the caches as cold as after
/// Envoy's own work between two requests (`--thrash-kb N`; 0: nothing is written).
pub struct Thrash {
    memory: Vec<u8>,
}

impl Thrash {
    pub fn new(kb: usize) -> Thrash {
        Thrash {
            memory: vec![0u8; kb * 1024],
        }
    }

    /// Write one byte of every cache line; returns the nanoseconds it took, which the
    /// caller leaves out of its timing (0, without reading the clock, when there is no
    /// memory to write).
    pub fn evict(&mut self) -> u128 {
        if self.memory.is_empty() {
            return 0;
        }
        let t = Instant::now();
        for (i, b) in self.memory.iter_mut().enumerate().step_by(64) {
            *b = b.wrapping_add(i as u8);
        }
        std::hint::black_box(&self.memory);
        t.elapsed().as_nanos()
    }
}
