//! Whole exchanges: arbitrary bytes played as a configuration and up to four interleaved
//! exchanges through the filter with the fake host (`tokenfuse::exchange::scenario::play`): hostile
//! headers, paths, bodies, chunkings, responses, admin requests, clients leaving, time
//! moving. Invariants (checked by `play`): nothing panics; no budget admits past its
//! limit; every reservation is settled or refunded exactly once; no log line holds request
//! data.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tokenfuse::exchange::scenario::play(data);
});
