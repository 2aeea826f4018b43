//! Decisions without I/O: what to check, what to write, how to rewrite a batch. Nothing
//! here is async or touches the store; the broker performs what these functions return.

pub mod batch;
pub mod dead_letter;
pub mod message;

use std::ops::Range;

pub(crate) fn to_ranges(offsets: &[u64]) -> Vec<Range<u64>> {
    let mut sorted = offsets.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<Range<u64>> = Vec::new();
    for offset in sorted {
        match out.last_mut() {
            Some(last) if last.end == offset => last.end += 1,
            Some(last) if last.end > offset => {}
            _ => out.push(offset..offset + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_coalesce() {
        assert_eq!(to_ranges(&[5, 1, 2, 3, 9, 2]), vec![1..4, 5..6, 9..10]);
        assert!(to_ranges(&[]).is_empty());
    }
}
