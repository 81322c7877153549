//! MELD's annotation CSVs (`{train,dev,test}_sent_emo.csv`).
//!
//! Rows are keyed by (Dialogue_ID, Utterance_ID): `Sr No.` repeats in train and IDs have
//! gaps. The current upstream files are UTF-8; older copies (and MELD.Raw) carry cp1252
//! punctuation as C1 control code points (`\u{92}` for ’ ...), which we map back.

use super::{Dataset, Dialogue, Utterance, MELD_LABELS};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The CSV file of a split inside a MELD folder.
pub fn csv_path(dir: &Path, split: &str) -> PathBuf {
    dir.join(format!("{split}_sent_emo.csv"))
}

/// MELD.Raw's clip folder of a split.
pub fn clip_folder(split: &str) -> &'static str {
    match split {
        "train" => "train_splits",
        "dev" => "dev_splits_complete",
        _ => "output_repeated_splits_test",
    }
}

/// Where `farcer prepare` writes the frame of an utterance, relative to the data dir.
pub fn frame_rel_path(split: &str, dia: &str, utt: &str) -> PathBuf {
    PathBuf::from("frames")
        .join(split)
        .join(format!("dia{dia}_utt{utt}.png"))
}

pub fn check_split(split: &str) -> Result<()> {
    match split {
        "train" | "dev" | "test" => Ok(()),
        other => Err(Error::input(
            "--split",
            format!("MELD has the splits train, dev and test, not `{other}`"),
        )),
    }
}

/// Reads one split. Frames written by `farcer prepare` (under `dir/frames/`) are attached
/// as images where they exist.
pub fn load(dir: &Path, split: &str) -> Result<Dataset> {
    check_split(split)?;
    let path = csv_path(dir, split);
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::input(
            path.display().to_string(),
            format!("cannot read MELD CSV ({e}); `meld:<dir>` must name a folder holding {split}_sent_emo.csv"),
        )
    })?;
    let mut dialogues = parse(&bytes, &path)?;
    for d in &mut dialogues {
        for u in &mut d.utterances {
            let f = dir.join(frame_rel_path(split, &d.id, &u.id));
            if f.is_file() {
                u.image = Some(f);
            }
        }
    }
    Ok(Dataset {
        corpus: "meld".into(),
        split: split.into(),
        labels: MELD_LABELS.iter().map(|s| s.to_string()).collect(),
        dialogues,
        max_context: None,
    })
}

/// Parses MELD CSV bytes (`path` is only for messages).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Vec<Dialogue>> {
    let text = decode_text(bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let loc = |line: u64| format!("{}:{}", path.display(), line);
    // The csv crate's own line numbers count the `\n` of a CRLF as the start of the next
    // record (one too few on every real MELD file), so lines are counted from the byte
    // offset instead.
    let line_of = |pos: Option<&csv::Position>| pos.map(|p| line_at(&text, p.byte())).unwrap_or(0);
    let headers = rdr
        .headers()
        .map_err(|e| Error::input(loc(line_of(e.position())), e.to_string()))?
        .clone();
    if headers.iter().all(|h| h.trim().is_empty()) {
        return Err(Error::input(
            path.display().to_string(),
            "the file is empty: a MELD CSV starts with a header line (Sr No.,Utterance,Speaker,Emotion,...)",
        ));
    }
    let col = |name: &str| -> Result<usize> {
        headers
            .iter()
            .position(|h| h.trim().trim_start_matches('\u{feff}') == name)
            .ok_or_else(|| Error::input(loc(1), format!("missing column `{name}`")))
    };
    let (c_utt, c_spk, c_emo, c_dia, c_uid) = (
        col("Utterance")?,
        col("Speaker")?,
        col("Emotion")?,
        col("Dialogue_ID")?,
        col("Utterance_ID")?,
    );
    let c_start = col("StartTime").ok();
    let c_end = col("EndTime").ok();

    let mut by_key: BTreeMap<(u64, u64), Utterance> = BTreeMap::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| Error::input(loc(line_of(e.position())), csv_message(&e)))?;
        let line = line_of(rec.position());
        let field = |c: usize, name: &str| -> Result<&str> {
            rec.get(c)
                .ok_or_else(|| Error::input(loc(line), format!("missing field `{name}`")))
        };
        let num = |c: usize, name: &str| -> Result<u64> {
            let v = field(c, name)?.trim();
            v.parse::<u64>()
                .map_err(|_| Error::input(loc(line), format!("`{name}` is not a number: `{v}`")))
        };
        let dia = num(c_dia, "Dialogue_ID")?;
        let uid = num(c_uid, "Utterance_ID")?;
        let emotion = field(c_emo, "Emotion")?.trim().to_lowercase();
        if !MELD_LABELS.contains(&emotion.as_str()) {
            return Err(Error::input(
                loc(line),
                format!(
                    "unknown Emotion `{emotion}` (MELD has {})",
                    MELD_LABELS.join(", ")
                ),
            ));
        }
        let mut u = Utterance::new(
            uid.to_string(),
            field(c_spk, "Speaker")?.trim(),
            clean_text(field(c_utt, "Utterance")?),
        )
        .with_label(emotion);
        if let Some(c) = c_start {
            u.start = parse_time(field(c, "StartTime")?)
                .map(Some)
                .map_err(|m| Error::input(loc(line), format!("StartTime: {m}")))?;
        }
        if let Some(c) = c_end {
            u.end = parse_time(field(c, "EndTime")?)
                .map(Some)
                .map_err(|m| Error::input(loc(line), format!("EndTime: {m}")))?;
        }
        if by_key.insert((dia, uid), u).is_some() {
            return Err(Error::input(
                loc(line),
                format!("duplicate (Dialogue_ID, Utterance_ID) = ({dia}, {uid})"),
            ));
        }
    }
    if by_key.is_empty() {
        return Err(Error::input(
            path.display().to_string(),
            "no utterances: the file has a header line but no rows",
        ));
    }
    let mut dialogues: Vec<Dialogue> = Vec::new();
    for ((dia, _), u) in by_key {
        let id = dia.to_string();
        match dialogues.last_mut() {
            Some(d) if d.id == id => d.utterances.push(u),
            _ => dialogues.push(Dialogue {
                id,
                utterances: vec![u],
            }),
        }
    }
    Ok(dialogues)
}

/// The 1-based line where the record at byte offset `byte` of `text` starts. The csv
/// crate's offset may point at the `\n` of the previous line's `\r\n`, or at blank lines
/// it skipped; a record never starts with a line end, so those are skipped first.
fn line_at(text: &str, byte: u64) -> u64 {
    let b = text.as_bytes();
    let mut at = usize::try_from(byte).unwrap_or(usize::MAX).min(b.len());
    while at < b.len() && (b[at] == b'\n' || b[at] == b'\r') {
        at += 1;
    }
    1 + b[..at].iter().filter(|&&c| c == b'\n').count() as u64
}

/// A CSV error without the crate's own (CRLF-miscounted) position: ours is in the location.
fn csv_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("this row has {len} fields, the header has {expected_len}"),
        _ => e.to_string(),
    }
}

/// UTF-8 if it is valid, else Windows-1252; then C1 code points mapped as cp1252 would.
pub fn decode_text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => s.chars().map(fix_c1).collect(),
        Err(_) => bytes.iter().map(|&b| fix_c1(b as char)).collect(),
    }
}

/// Normalises an utterance: cp1252 mojibake fixed, non-breaking spaces made plain, outer
/// whitespace trimmed. Inner double spaces are kept: they are what the corpus says.
pub fn clean_text(s: &str) -> String {
    s.chars()
        .map(fix_c1)
        .map(|c| if c == '\u{a0}' { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Maps a C1 control character (U+0080..U+009F) to the character cp1252 puts at that byte.
fn fix_c1(c: char) -> char {
    const CP1252: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž',
        '\u{8f}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}',
        'ž', 'Ÿ',
    ];
    let u = c as u32;
    if (0x80..=0x9f).contains(&u) {
        CP1252[(u - 0x80) as usize]
    } else {
        c
    }
}

/// `h:mm:ss,ms` / `hh:mm:ss,ms` (a few rows have two fraction digits) to seconds.
pub fn parse_time(s: &str) -> std::result::Result<f64, String> {
    let s = s.trim();
    let (hms, frac) = match s.split_once([',', '.']) {
        Some((a, b)) => (a, b),
        None => (s, "0"),
    };
    let parts: Vec<&str> = hms.split(':').collect();
    if parts.len() != 3 || frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected h:mm:ss,ms, got `{s}`"));
    }
    let mut secs = 0.0;
    for p in &parts {
        let v: f64 = p
            .parse::<u32>()
            .map_err(|_| format!("expected h:mm:ss,ms, got `{s}`"))? as f64;
        secs = secs * 60.0 + v;
    }
    let frac: f64 = format!("0.{frac}")
        .parse()
        .map_err(|_| format!("bad fraction in `{s}`"))?;
    Ok(secs + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_crlf_gaps_and_unsorted_rows() {
        let csv = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\r\n\
            3,\"Hi, there\",Ross,joy,positive,1,2,1,1,\"0:00:01,500\",\"00:00:02,05\"\r\n\
            1,Hey.,Rachel,neutral,neutral,1,0,1,1,\"00:00:00,000\",\"00:00:01,000\"\r\n\
            2,Oh.,Rachel,surprise,positive,0,0,1,1,\"00:00:00,000\",\"00:00:01,000\"\r\n";
        let d = parse(csv.as_bytes(), Path::new("x.csv")).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].id, "0");
        assert_eq!(d[1].utterances.len(), 2);
        assert_eq!(d[1].utterances[1].id, "2");
        assert_eq!(d[1].utterances[1].text, "Hi, there");
        assert_eq!(d[1].utterances[1].start, Some(1.5));
        assert!((d[1].utterances[1].end.unwrap() - 2.05).abs() < 1e-9);
    }

    #[test]
    fn maps_cp1252_c1_points_and_raw_cp1252_bytes() {
        assert_eq!(clean_text("It\u{92}s\u{a0}ok\u{85}"), "It’s ok…");
        // A file that is not UTF-8 at all: byte 0x92 is cp1252's right quote.
        assert_eq!(decode_text(b"it\x92s"), "it’s");
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let csv =
            "Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\nhi,A,joy,0,0\nho,B,happy,0,1\n";
        let e = parse(csv.as_bytes(), Path::new("f.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.csv:3") && e.contains("happy"), "{e}");
        let csv = "Utterance,Speaker,Emotion,Dialogue_ID\nhi,A,joy,0\n";
        let e = parse(csv.as_bytes(), Path::new("f.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Utterance_ID"), "{e}");
    }

    #[test]
    fn crlf_files_get_the_right_line_numbers() {
        // Every real MELD file ends its lines with CRLF; a quoted field spans two lines and
        // blank lines are skipped, and the bad rows must still be named by their own line.
        let rows = [
            "Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID",
            "\"two\r\nlines\",A,joy,0,0",
            "",
            "ok,B,anger,0,1",
            "bad,C,happy,0,2",
        ];
        for eol in ["\r\n", "\n"] {
            let csv = rows.join(eol) + eol;
            let e = parse(csv.as_bytes(), Path::new("f.csv"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("f.csv:6:") && e.contains("happy"),
                "{eol:?}: {e}"
            );
            let short = format!("{}{eol}x,A,joy{eol}", rows[0]);
            let e = parse(short.as_bytes(), Path::new("f.csv"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("f.csv:2:") && e.contains("3 fields"),
                "{eol:?}: {e}"
            );
        }
    }

    #[test]
    fn empty_and_header_only_files_are_refused() {
        for csv in [
            "",
            "\r\n",
            "Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\r\n",
        ] {
            let e = parse(csv.as_bytes(), Path::new("dev_sent_emo.csv"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("dev_sent_emo.csv:")
                    && (e.contains("empty") || e.contains("no rows")),
                "{csv:?}: {e}"
            );
        }
    }

    #[test]
    fn time_formats() {
        assert!((parse_time("00:16:16,059").unwrap() - 976.059).abs() < 1e-9);
        assert_eq!(parse_time("0:00:01,5").unwrap(), 1.5);
        assert!(parse_time("16:16").is_err());
    }
}
