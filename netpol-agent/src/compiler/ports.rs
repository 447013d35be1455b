//! Ports as policy LPM prefixes.

use netpol_common::{POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_FULL};

/// Splits the inclusive range `start..=end` into the fewest aligned blocks,
/// each given as `(first port, policy prefix length)`: prefix 80 + k matches
/// the ports whose first k bits equal the first port's.
pub fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(start), u32::from(end));
    while lo <= hi {
        // Largest power-of-two block aligned at `lo` that ends at or before `hi`.
        let mut bits = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        let port = u16::try_from(lo).expect("lo <= hi <= u16::MAX");
        out.push((port, POLICY_PREFIX_FULL - bits));
        lo += 1 << bits;
    }
    out
}

/// Whether `port` falls in the block `(first, prefix)` made by [`port_prefixes`].
pub fn prefix_contains(first: u16, prefix: u32, port: u16) -> bool {
    let bits = prefix.saturating_sub(POLICY_PREFIX_ANY_PORT).min(16);
    let mask = if bits == 0 {
        0
    } else {
        u16::MAX << (16 - bits)
    };
    port & mask == first & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(blocks: &[(u16, u32)]) -> Vec<u16> {
        let mut v: Vec<u16> = (0..=u16::MAX)
            .filter(|&p| blocks.iter().any(|&(f, l)| prefix_contains(f, l, p)))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn single_port_is_a_full_prefix() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 96)]);
    }

    #[test]
    fn whole_range_is_one_prefix() {
        assert_eq!(port_prefixes(0, u16::MAX), vec![(0, 80)]);
        assert_eq!(port_prefixes(1, u16::MAX).len(), 16);
    }

    #[test]
    fn ranges_are_covered_exactly_and_minimally() {
        for (s, e) in [
            (8000, 8080),
            (1, 1024),
            (32768, 60999),
            (5, 6),
            (65535, 65535),
            (1023, 1024),
        ] {
            let blocks = port_prefixes(s, e);
            assert_eq!(expand(&blocks), (s..=e).collect::<Vec<_>>(), "{s}-{e}");
            assert!(blocks.len() <= 30, "{s}-{e}: {} blocks", blocks.len());
        }
        assert_eq!(
            port_prefixes(8000, 8080),
            vec![(8000, 90), (8064, 92), (8080, 96)],
            "8000-8063, 8064-8079, 8080"
        );
    }
}
