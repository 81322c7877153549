//! Chat templates against transformers' apply_chat_template, and metrics against
//! scikit-learn, both on fixed inputs.

mod common;
use common::*;
use farcer::metrics;
use farcer::prompt::template::{ChatTemplate, Message};

#[test]
fn chat_templates_render_like_transformers() {
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("chat-templates.json")).unwrap())
            .unwrap();
    let convs: Vec<Vec<Message>> = f["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect()
        })
        .collect();
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for c in cases {
        let name = c["template"].as_str().unwrap();
        let t = ChatTemplate::new(
            f["templates"][name].as_str().unwrap(),
            "<|begin_of_text|>",
            "<|eot_id|>",
        )
        .unwrap();
        let conv = &convs[c["conversation"].as_u64().unwrap() as usize];
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            t.render(conv, gen).unwrap(),
            c["text"].as_str().unwrap(),
            "{name}, gen={gen}"
        );
    }
}

/// scikit-learn's `precision_recall_fscore_support(labels=..., zero_division=0)`,
/// `f1_score(average=weighted|macro)`, `accuracy_score`; tolerance 1e-9 (percent).
#[test]
fn metrics_match_scikit_learn() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("metrics-sklearn.json")).unwrap())
            .unwrap();
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    for c in &cases {
        let labels = strs(&c["labels"]);
        let s = metrics::score(&labels, &strs(&c["gold"]), &strs(&c["pred"]));
        assert!(
            close(s.weighted_f1, c["weighted_f1"].as_f64().unwrap()),
            "{} vs {}",
            s.weighted_f1,
            c["weighted_f1"]
        );
        assert!(close(s.macro_f1, c["macro_f1"].as_f64().unwrap()));
        assert!(close(s.accuracy, c["accuracy"].as_f64().unwrap()));
        for (i, (l, ls)) in s.per_label.iter().enumerate() {
            assert_eq!(l, &labels[i]);
            assert!(
                close(ls.precision, c["precision"][i].as_f64().unwrap()),
                "{l} precision"
            );
            assert!(
                close(ls.recall, c["recall"][i].as_f64().unwrap()),
                "{l} recall"
            );
            assert!(close(ls.f1, c["f1"][i].as_f64().unwrap()), "{l} f1");
            assert_eq!(ls.support as u64, c["support"][i].as_u64().unwrap());
        }
        for (i, row) in s.confusion.matrix.iter().enumerate() {
            let want: Vec<usize> = c["confusion"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(&row[..labels.len()], &want[..], "confusion row {i}");
        }
    }
}
