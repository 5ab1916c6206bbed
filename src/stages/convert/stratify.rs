//! Iterative stratification of items with several labels (Sechidis, Tsoumakas & Vlahavas,
//! "On the stratification of multi-label data", ECML PKDD 2011), over duplicate groups.
//!
//! Splitting by each item's set of labels (its combination) keeps every combination in
//! proportion, but most combinations of a set with many labels hold one or two items: each
//! rounds to nothing in the small splits, which then lose whole labels. Iterative
//! stratification instead serves the rarest label first: each of its groups goes to the
//! split that still wants most of that label (then most items), and every split's wants
//! go down by what the group brings. Rare labels are placed while there is still room for
//! them everywhere; common ones even out at the end.

use crate::rng::Rng;

/// A unit that must stay in one split: its items and how many of them have each label.
pub(super) struct Group {
    pub items: usize,
    /// (label, items of the group with it), each label once.
    pub labels: Vec<(usize, usize)>,
}

/// The split (an index into `shares`) of each group, for `labels` labels; `shares` are
/// fractions of the items summing to 1 (zero shares get nothing). Ties go to the first
/// split in `shares` order; `seed` orders each label's groups.
pub(super) fn iterative(groups: &[Group], labels: usize, shares: &[f64], seed: u64) -> Vec<usize> {
    let splits = shares.len();
    let total_items: usize = groups.iter().map(|g| g.items).sum();
    let mut label_totals = vec![0usize; labels];
    for g in groups {
        for &(l, n) in &g.labels {
            label_totals[l] += n;
        }
    }
    // What each split still wants: items, and items of each label.
    let mut want: Vec<f64> = shares.iter().map(|s| s * total_items as f64).collect();
    let mut want_label: Vec<Vec<f64>> = shares.iter().map(|s| label_totals.iter().map(|&t| s * t as f64).collect()).collect();
    let mut remaining = label_totals.clone();
    let mut of: Vec<Option<usize>> = vec![None; groups.len()];
    let mut order: Vec<usize> = (0..groups.len()).collect();
    Rng::for_item(seed, "convert-iterative", 0).shuffle(&mut order);
    let place = |g: usize,
                 j: usize,
                 of: &mut Vec<Option<usize>>,
                 want: &mut Vec<f64>,
                 want_label: &mut Vec<Vec<f64>>,
                 remaining: &mut Vec<usize>| {
        of[g] = Some(j);
        want[j] -= groups[g].items as f64;
        for &(l, n) in &groups[g].labels {
            want_label[j][l] -= n as f64;
            remaining[l] -= n;
        }
    };
    let open = |j: usize| shares[j] > 0.0;
    while let Some(l) = (0..labels).filter(|&l| remaining[l] > 0).min_by_key(|&l| (remaining[l], l)) {
        for &g in &order {
            if of[g].is_some() || !groups[g].labels.iter().any(|&(gl, _)| gl == l) {
                continue;
            }
            // The open split that wants most of this label, then most items; the first on ties.
            let j = (0..splits)
                .filter(|&j| open(j))
                .fold(None, |best: Option<usize>, j| match best {
                    Some(b) if (want_label[j][l], want[j]) <= (want_label[b][l], want[b]) => Some(b),
                    _ => Some(j),
                })
                .expect("some share is above 0");
            place(g, j, &mut of, &mut want, &mut want_label, &mut remaining);
        }
    }
    // Groups without a label: where most items are still wanted.
    for &g in &order {
        if of[g].is_none() {
            let j = (0..splits).filter(|&j| open(j)).fold(None, |best: Option<usize>, j| match best {
                Some(b) if want[j] <= want[b] => Some(b),
                _ => Some(j),
            });
            place(g, j.expect("some share is above 0"), &mut of, &mut want, &mut want_label, &mut remaining);
        }
    }
    of.into_iter().map(|j| j.expect("every group placed")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(labels: &[usize]) -> Group {
        Group { items: 1, labels: labels.iter().map(|&l| (l, 1)).collect() }
    }

    /// 200 items whose label sets are almost all different (a common label 0, and two of
    /// 40 rare labels each): every split gets its share of every label within one or two
    /// items, where splitting by combination puts nearly everything in train.
    #[test]
    fn rare_labels_reach_every_split_in_their_shares() {
        let mut rng = Rng::new(7);
        let groups: Vec<Group> = (0..200)
            .map(|_| {
                let a = 1 + rng.below(40) as usize;
                let b = 1 + (a + rng.below(39) as usize) % 40;
                group(&[0, a, b])
            })
            .collect();
        let shares = [0.15, 0.15, 0.7];
        let of = iterative(&groups, 41, &shares, 3);
        let count = |j: usize| of.iter().filter(|&&s| s == j).count();
        assert!((count(0) as i64 - 30).abs() <= 2 && (count(1) as i64 - 30).abs() <= 2, "{} {}", count(0), count(1));
        // How far each (label, split) count is from its share, in all: against a seeded
        // random assignment with the same split sizes.
        let error = |of: &[usize]| -> f64 {
            let mut e = 0.0;
            for l in 0..41 {
                let total = groups.iter().filter(|g| g.labels.iter().any(|x| x.0 == l)).count() as f64;
                for (j, share) in shares.iter().enumerate() {
                    let got = groups.iter().zip(of).filter(|(g, s)| **s == j && g.labels.iter().any(|x| x.0 == l)).count() as f64;
                    e += (got - share * total).abs();
                }
            }
            e
        };
        let mut random: Vec<usize> = (0..200)
            .map(|i| {
                if i < 30 {
                    0
                } else if i < 60 {
                    1
                } else {
                    2
                }
            })
            .collect();
        Rng::new(11).shuffle(&mut random);
        let (ours, theirs) = (error(&of), error(&random));
        eprintln!("iterative {ours:.1}, random {theirs:.1}");
        assert!(ours < 0.5 * theirs, "iterative {ours:.1}, random {theirs:.1}");
        // Every label with at least one item's worth of share in a split has an item there.
        for l in 1..41 {
            let total = groups.iter().filter(|g| g.labels.iter().any(|x| x.0 == l)).count() as f64;
            for (j, share) in shares.iter().enumerate() {
                let got = groups.iter().zip(&of).filter(|(g, s)| **s == j && g.labels.iter().any(|x| x.0 == l)).count();
                assert!(share * total < 1.0 || got > 0, "label {l} has no item in split {j} ({total} in all)");
            }
        }
        // Seeded: the same seed, the same splits; a zero share gets nothing.
        assert_eq!(of, iterative(&groups, 41, &shares, 3));
        assert!(iterative(&groups, 41, &[0.0, 0.2, 0.8], 3).iter().all(|&j| j != 0));
    }

    /// A group counts all its items, and groups with no label still fill the splits.
    #[test]
    fn groups_stay_whole_and_unlabelled_ones_fill_in() {
        let groups = vec![Group { items: 3, labels: vec![(0, 3)] }, group(&[0]), group(&[]), group(&[]), group(&[])];
        let of = iterative(&groups, 1, &[0.5, 0.5], 1);
        let items = |j: usize| groups.iter().zip(&of).filter(|(_, s)| **s == j).map(|(g, _)| g.items).sum::<usize>();
        assert_eq!(items(0) + items(1), 7);
        assert!(items(0).abs_diff(items(1)) <= 1, "{of:?}");
    }
}
