//! "Did you mean" suggestions for misspelt names.

/// The candidates closest to `word` (all at the smallest distance, at most `max`, by name),
/// if they are close enough to be likely typos.
pub(crate) fn close<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    max: usize,
) -> Vec<&'a str> {
    // A third of the length, at least one edit: "scroe" → "score", not "a" → "b".
    let limit = (word.chars().count() / 3).max(1);
    let mut near: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .collect();
    near.sort();
    near.dedup();
    let best = near.first().map_or(0, |(d, _)| *d);
    near.into_iter()
        .take_while(|(d, _)| *d == best)
        .take(max)
        .map(|(_, c)| c)
        .collect()
}

/// The one candidate closest to `word`, if close enough.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    close(word, candidates, 1).into_iter().next()
}

/// Edit distance over chars where swapping two neighbours counts as one edit (optimal string
/// alignment), since "scroe" for "score" is a typical typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
        assert_eq!(edit_distance("scroe", "score"), 1);
    }

    #[test]
    fn closest_first_and_only_close_ones() {
        let names = ["score", "scope", "site", "label"];
        assert_eq!(close("scote", names, 3), ["scope", "score"]);
        assert_eq!(close("scroe", names, 3), ["score"]);
        assert_eq!(close("scoree", names, 3), ["score"], "only the closest");
        assert_eq!(close("xyz", names, 3), Vec::<&str>::new());
        assert_eq!(did_you_mean("lable", names), Some("label"));
    }
}
