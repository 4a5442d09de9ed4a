//! Maglev consistent hashing (Eisenbud et al., NSDI 2016). The lookup
//! table is computed here; the kernel only indexes it with
//! `lb_common::flow_hash`. Pure code.
//!
//! The table depends only on the backends' addresses and ports and on the
//! table size, through hashes defined here (not std's, which may change
//! between Rust versions): the same backends give the same table across
//! agent restarts and upgrades, so no flow is reshuffled by either.
use lb_common::Backend;

use crate::family::Family;

/// Whether `n` is prime; table sizes must be.
pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u32| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// 64-bit FNV-1a from `basis`.
fn fnv1a(basis: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(basis, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// What a backend's hashes are of: its address's bytes, then its port's
/// (both in network order).
fn identity<A: Family>(backend: &Backend<A>) -> Vec<u8> {
    let mut bytes = backend.addr.octets();
    bytes.extend_from_slice(&backend.port);
    bytes
}

/// The lookup table of `size` entries (a prime), each an index into
/// `backends`. Empty when there are no backends.
pub fn table<A: Family>(backends: &[Backend<A>], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    if backends.is_empty() || m < 2 {
        return Vec::new();
    }
    // Each backend's preference list is offset, offset+skip, offset+2*skip...
    let (offsets, skips): (Vec<u64>, Vec<u64>) = backends
        .iter()
        .map(|b| {
            let id = identity(b);
            (fnv1a(0xcbf2_9ce4_8422_2325, &id) % m, fnv1a(0x84222325_cbf29ce4, &id) % (m - 1) + 1)
        })
        .unzip();
    let mut next = vec![0u64; backends.len()];
    let mut entries = vec![u32::MAX; size as usize];
    let mut filled = 0;
    // Backends take turns claiming their next preferred free entry.
    loop {
        for i in 0..backends.len() {
            let mut c = (offsets[i] + next[i] * skips[i]) % m;
            while entries[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offsets[i] + next[i] * skips[i]) % m;
            }
            entries[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                return entries;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<Backend> {
        (1..=n).map(|i| Backend::new([10, 0, 1, i], 8080u16.to_be_bytes())).collect()
    }

    #[test]
    fn primes() {
        let primes: Vec<u32> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(16_381) && is_prime(65_521) && !is_prime(65_535));
    }

    /// The table for given backends must never change between versions:
    /// an upgrade that changed it would move established UDP flows and
    /// every new connection's backend. Pinned here byte for byte.
    const DIGEST_10_BACKENDS_16381: u64 = 0x9d35_540c_cb65_bb75;

    #[test]
    fn golden_tables_are_stable() {
        assert_eq!(table(&backends(3), 13), [2, 2, 0, 2, 1, 1, 0, 2, 0, 0, 1, 0, 1]);
        let big = table(&backends(10), 16_381);
        let digest = big.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, e| fnv1a(h, &e.to_le_bytes()));
        assert_eq!(digest, DIGEST_10_BACKENDS_16381, "the 10-backend, 16381-entry table changed: {digest:#x}");
    }

    #[test]
    fn every_backend_gets_its_share() {
        let t = table(&backends(7), 16_381);
        let mut counts = [0usize; 7];
        for e in &t {
            counts[*e as usize] += 1;
        }
        let share = 16_381 / 7;
        assert!(counts.iter().all(|c| c.abs_diff(share) <= share / 100 + 1), "{counts:?}");
    }

    #[test]
    fn removing_one_of_n_backends_moves_little_more_than_its_share() {
        for n in [3u8, 10, 50] {
            let before_set = backends(n);
            let before = table(&before_set, 16_381);
            for removed in [0usize, (n / 2) as usize] {
                let mut after_set = before_set.clone();
                after_set.remove(removed);
                let after = table(&after_set, 16_381);
                let moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| before_set[**b as usize] != after_set[**a as usize])
                    .count();
                let fraction = moved as f64 / 16_381.0;
                let bound = 1.0 / f64::from(n) + 0.02;
                eprintln!(
                    "{n} backends, one removed: {:.2}% of entries moved (bound {:.2}%)",
                    fraction * 100.0,
                    bound * 100.0
                );
                assert!(fraction <= bound, "{n} backends: {fraction} > {bound}");
            }
        }
    }

    #[test]
    fn a_table_of_65521_entries_for_100_backends() {
        let many: Vec<Backend> =
            (0..100u32).map(|i| Backend::new((0x0a00_0000 + i).to_be_bytes(), 80u16.to_be_bytes())).collect();
        let started = std::time::Instant::now();
        let t = table(&many, 65_521);
        eprintln!("maglev table 65521 x 100 backends built in {:?}", started.elapsed());
        assert_eq!(t.len(), 65_521);
        assert!(t.iter().all(|e| (*e as usize) < many.len()));
    }
}
