//! Scores over a fixed label set, as scikit-learn computes them with `labels=` given:
//! per-label precision / recall / F1 (0 where undefined), accuracy over all samples,
//! support-weighted and macro F1. A prediction outside the label set (`invalid`) is
//! always wrong: it counts against the gold class's recall and is no class itself.

use serde::{Deserialize, Serialize};

/// The prediction given for outputs that are no label.
pub const INVALID: &str = "invalid";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    /// Column names: the labels, then `invalid`. Rows are the gold labels (no `invalid`).
    pub labels: Vec<String>,
    pub matrix: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub n: usize,
    /// Percent, like the paper.
    pub accuracy: f64,
    pub weighted_f1: f64,
    pub macro_f1: f64,
    /// Number of predictions that were no label.
    pub invalid: usize,
    /// Label -> scores (percent), in label order.
    pub per_label: indexmap_like::OrderedMap<LabelScore>,
    pub confusion: Confusion,
}

/// A tiny insertion-ordered map that serialises as a JSON object (label order matters
/// in reports; pulling in `indexmap` for this is not worth it).
pub mod indexmap_like {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct OrderedMap<V>(pub Vec<(String, V)>);

    impl<V> OrderedMap<V> {
        pub fn get(&self, k: &str) -> Option<&V> {
            self.0.iter().find(|(key, _)| key == k).map(|(_, v)| v)
        }
        pub fn iter(&self) -> impl Iterator<Item = &(String, V)> {
            self.0.iter()
        }
    }

    impl<V: Serialize> Serialize for OrderedMap<V> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }

    impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit<V>(std::marker::PhantomData<V>);
            impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
                type Value = OrderedMap<V>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a map")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut a: A,
                ) -> Result<Self::Value, A::Error> {
                    let mut v = Vec::new();
                    while let Some((k, val)) = a.next_entry::<String, V>()? {
                        v.push((k, val));
                    }
                    Ok(OrderedMap(v))
                }
            }
            d.deserialize_map(Visit(std::marker::PhantomData))
        }
    }
}

/// Scores `pred` against `gold` over `labels`.
pub fn score(labels: &[String], gold: &[String], pred: &[String]) -> Scores {
    assert_eq!(
        gold.len(),
        pred.len(),
        "gold and predictions differ in length"
    );
    let k = labels.len();
    let idx = |s: &str| labels.iter().position(|l| l == s);
    // rows: gold label; columns: predicted label, then "invalid / other".
    let mut m = vec![vec![0usize; k + 1]; k];
    let mut correct = 0;
    let mut invalid = 0;
    let mut pred_counts = vec![0usize; k];
    for (g, p) in gold.iter().zip(pred) {
        if g == p {
            correct += 1;
        }
        let pi = idx(p);
        match pi {
            Some(j) => pred_counts[j] += 1,
            None => invalid += 1,
        }
        if let Some(i) = idx(g) {
            m[i][pi.unwrap_or(k)] += 1;
        }
    }
    let mut per_label = Vec::new();
    let mut wsum = 0.0;
    let mut fsum = 0.0;
    let mut total_support = 0;
    for (i, l) in labels.iter().enumerate() {
        let tp = m[i][i] as f64;
        let support: usize = m[i].iter().sum();
        let precision = if pred_counts[i] > 0 {
            tp / pred_counts[i] as f64
        } else {
            0.0
        };
        let recall = if support > 0 {
            tp / support as f64
        } else {
            0.0
        };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        wsum += f1 * support as f64;
        fsum += f1;
        total_support += support;
        per_label.push((
            l.clone(),
            LabelScore {
                precision: 100.0 * precision,
                recall: 100.0 * recall,
                f1: 100.0 * f1,
                support,
            },
        ));
    }
    let n = gold.len();
    let mut cols = labels.to_vec();
    cols.push(INVALID.to_string());
    Scores {
        n,
        accuracy: if n > 0 {
            100.0 * correct as f64 / n as f64
        } else {
            0.0
        },
        weighted_f1: if total_support > 0 {
            100.0 * wsum / total_support as f64
        } else {
            0.0
        },
        macro_f1: if k > 0 { 100.0 * fsum / k as f64 } else { 0.0 },
        invalid,
        per_label: indexmap_like::OrderedMap(per_label),
        confusion: Confusion {
            labels: cols,
            matrix: m,
        },
    }
}

/// Normalises a generated answer: whitespace and punctuation trimmed, lower case. It is
/// the label if it equals one, else [`INVALID`].
pub fn parse_answer(text: &str, labels: &[String]) -> String {
    let t = text
        .trim_matches(|c: char| {
            c.is_whitespace() || c.is_ascii_punctuation() || "“”‘’«»…".contains(c)
        })
        .to_lowercase();
    if labels.contains(&t) {
        t
    } else {
        INVALID.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn answers_are_trimmed_and_lowercased() {
        let l = s(&["joy", "anger"]);
        assert_eq!(parse_answer(" Joy.\n", &l), "joy");
        assert_eq!(parse_answer("\"anger\"", &l), "anger");
        assert_eq!(parse_answer("joyful", &l), INVALID);
        assert_eq!(parse_answer("", &l), INVALID);
    }

    #[test]
    fn confusion_has_invalid_column_and_rows_are_gold() {
        let sc = score(
            &s(&["a", "b"]),
            &s(&["a", "a", "b"]),
            &s(&["a", "zzz", "a"]),
        );
        assert_eq!(sc.confusion.labels, s(&["a", "b", "invalid"]));
        assert_eq!(sc.confusion.matrix, vec![vec![1, 0, 1], vec![1, 0, 0]]);
        assert_eq!(sc.invalid, 1);
    }
}
