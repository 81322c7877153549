//! Frames with ffmpeg on videos made here: IEMOCAP's speaker halves and cut borders,
//! MELD's middle frames with very short, broken and missing clips; then `--init`.

mod common;
use common::*;
use farcer::data::{frames, Scope};
use std::path::Path;
use std::process::Command;

fn ffmpeg_ok() -> bool {
    if frames::check_ffmpeg().is_ok() {
        return true;
    }
    missing("ffmpeg");
    false
}

/// A split-screen video: red on the left half, blue on the right.
fn split_screen(path: &Path, secs: f64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let st = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            &format!("color=c=red:s=40x60:d={secs}:r=10"),
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("color=c=blue:s=40x60:d={secs}:r=10"))
        .args([
            "-filter_complex",
            "hstack",
            "-c:v",
            "mpeg4",
            "-q:v",
            "2",
            "-y",
        ])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

fn colour_clip(path: &Path, colour: &str, secs: f64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let st = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            &format!("color=c={colour}:s=64x48:d={secs}:r=10"),
            "-c:v",
            "mpeg4",
            "-y",
        ])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let t = to.join(p.file_name().unwrap());
        if p.is_dir() {
            std::fs::create_dir_all(&t).unwrap();
            copy_tree(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

fn iemocap_frames_show_the_speakers_half_without_borders() {
    if !ffmpeg_ok() {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("farcer-iemocap-{}", std::process::id()));
    let root = tmp.join("IEMOCAP");
    std::fs::create_dir_all(&root).unwrap();
    copy_tree(&fixture("iemocap"), &root);
    let sessions = farcer::data::iemocap::read_sessions(&root, 0).unwrap();
    for s in &sessions {
        let end = s
            .dialogue
            .utterances
            .iter()
            .filter_map(|u| u.end)
            .fold(0.0, f64::max);
        split_screen(
            &farcer::data::iemocap::video_path(&root, s.session, &s.dialogue.id),
            end + 1.0,
        );
    }
    let out = tmp.join("prepared");
    let rep =
        farcer::pipeline::prepare_iemocap(&root, &out, None, false, 2, 0, &|_, _, _| {}).unwrap();
    let turns: usize = sessions.iter().map(|s| s.dialogue.utterances.len()).sum();
    assert_eq!(
        (
            rep.frames.written,
            rep.frames.unreadable,
            rep.frames.missing_clip
        ),
        (turns, 0, 0)
    );
    // The subject (F for Ses01F) is on the left: red; the other speaker on the right: blue.
    let s = &sessions[0];
    for u in &s.dialogue.utterances {
        let img = image::open(farcer::data::iemocap::frame_path(
            &out.join("frames"),
            &s.dialogue.id,
            &u.id,
        ))
        .unwrap()
        .to_rgb8();
        assert_eq!(
            (img.width(), img.height()),
            (40, 36),
            "half width, top and bottom fifth cut"
        );
        let p = img.get_pixel(20, 18).0;
        let (want_red, name) = (u.speaker.starts_with(s.left_speaker), &u.id);
        assert_eq!(p[0] > 150 && p[2] < 100, want_red, "{name}: {p:?}");
        assert_eq!(p[2] > 150 && p[0] < 100, !want_red, "{name}: {p:?}");
    }
    // The prepared folder is an iemocap: data dir whose utterances carry their frames.
    let spec: farcer::data::spec::DataSpec = format!("iemocap:{}", out.display()).parse().unwrap();
    let test = spec.load("test", 0).unwrap();
    assert!(test
        .dialogues
        .iter()
        .flat_map(|d| &d.utterances)
        .all(|u| u.image.as_ref().is_some_and(|p| p.is_file())));
    std::fs::remove_dir_all(tmp).unwrap();
}

fn meld_middle_frames_short_broken_and_missing_clips() {
    if !ffmpeg_ok() {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("farcer-meld-frames-{}", std::process::id()));
    let csv_dir = tmp.join("csv");
    std::fs::create_dir_all(&csv_dir).unwrap();
    let header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n";
    let rows = "1,Hi.,A,joy,positive,0,0,1,1,\"0:00:01,000\",\"0:00:03,000\"\n\
                2,Oh.,B,surprise,positive,0,1,1,1,\"0:00:03,000\",\"0:00:03,300\"\n\
                3,Hm.,A,neutral,neutral,0,2,1,1,\"0:00:04,000\",\"0:00:05,000\"\n\
                4,No.,B,anger,negative,1,0,1,1,\"0:00:04,000\",\"0:00:05,000\"\n";
    for split in ["train", "dev", "test"] {
        std::fs::write(
            csv_dir.join(format!("{split}_sent_emo.csv")),
            format!("{header}{rows}"),
        )
        .unwrap();
    }
    // MELD.Raw layout for train; the test split's clips given as their own folder.
    let raw = tmp.join("MELD.Raw");
    colour_clip(&raw.join("train_splits/dia0_utt0.mp4"), "green", 2.0);
    colour_clip(&raw.join("train_splits/dia0_utt1.mp4"), "white", 0.3); // 0.5 s or less: frame at t = 0
    std::fs::write(raw.join("train_splits/dia0_utt2.mp4"), b"not a video").unwrap(); // broken
                                                                                     // dia1_utt0 has no clip at all.
    let out = tmp.join("data");
    let rep = farcer::pipeline::prepare_meld(
        &csv_dir,
        &raw,
        &out,
        &["train".into()],
        None,
        false,
        2,
        &|_, _, _| {},
    )
    .unwrap();
    assert_eq!(
        (
            rep.frames.written,
            rep.frames.unreadable,
            rep.frames.missing_clip
        ),
        (2, 1, 1),
        "{:?}",
        rep.frames
    );
    let green = image::open(out.join("frames/train/dia0_utt0.png"))
        .unwrap()
        .to_rgb8();
    assert!(green.get_pixel(10, 10).0[1] > 100);
    assert!(
        out.join("frames/train/dia0_utt1.png").is_file(),
        "a 0.3 s clip still gives its first frame"
    );
    let d = farcer::data::meld::load(&out, "train").unwrap();
    let with_image = d
        .dialogues
        .iter()
        .flat_map(|x| &x.utterances)
        .filter(|u| u.image.is_some())
        .count();
    assert_eq!(with_image, 2);
    assert!(out.join("prepare-report.json").is_file());
    // Running again reuses every frame.
    let again = farcer::pipeline::prepare_meld(
        &csv_dir,
        &raw,
        &out,
        &["train".into()],
        None,
        false,
        2,
        &|_, _, _| {},
    )
    .unwrap();
    assert_eq!((again.frames.written, again.frames.reused), (0, 2));
    // A video folder without any usable clip is an error naming it, not an empty success.
    let empty = tmp.join("no-videos");
    std::fs::create_dir_all(&empty).unwrap();
    let e = farcer::pipeline::prepare_meld(
        &csv_dir,
        &empty,
        &tmp.join("data2"),
        &["dev".into()],
        None,
        false,
        2,
        &|_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(&empty.display().to_string())
            && e.contains("no frame could be made for any of the 4 utterances (4 clips missing"),
        "{e}"
    );
    // One's own data with only a clip named: the frame is taken and cached.
    let mut own = farcer::data::Dataset {
        corpus: "jsonl".into(),
        split: "x".into(),
        labels: vec!["joy".into()],
        dialogues: vec![farcer::data::Dialogue {
            id: "a".into(),
            utterances: vec![{
                let mut u = farcer::data::Utterance::new("0", "A", "hi").with_label("joy");
                u.clip = Some(raw.join("train_splits/dia0_utt0.mp4"));
                u
            }],
        }],
        max_context: None,
    };
    // Clips are checked before ffmpeg sees them: a folder or a FIFO is not a clip, and a
    // clip over the size limit is refused.
    let limits = farcer::limits::InputLimits::default();
    let fifo = tmp.join("fifo.mp4");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (clip, max, want) in [
        (raw.clone(), u64::MAX, "not a regular file (a folder)"),
        (fifo.clone(), u64::MAX, "not a regular file (a FIFO)"),
        (
            raw.join("train_splits/dia0_utt0.mp4"),
            100,
            "more than the 100 allowed",
        ),
        (raw.join("none.mp4"), u64::MAX, "no such file"),
    ] {
        let mut bad = own.clone();
        bad.dialogues[0].utterances[0].clip = Some(clip.clone());
        let l = farcer::limits::InputLimits {
            max_clip_bytes: max,
            ..limits
        };
        let failed = frames::resolve_clip_frames(&mut bad, &tmp.join("cache-bad"), &l);
        assert_eq!(failed.len(), 1, "{clip:?}");
        assert!(
            failed[0].0 == clip && failed[0].1.contains(want),
            "{failed:?}"
        );
        assert!(bad.dialogues[0].utterances[0].image.is_none());
    }
    assert!(frames::resolve_clip_frames(&mut own, &tmp.join("cache"), &limits).is_empty());
    assert!(own.dialogues[0].utterances[0]
        .image
        .as_ref()
        .unwrap()
        .is_file());
    assert_eq!(own.samples(Scope::Last).len(), 1);
    std::fs::remove_dir_all(tmp).unwrap();
}

fn main() -> std::process::ExitCode {
    common::harness::main(tests![
        iemocap_frames_show_the_speakers_half_without_borders
            .needs("ffmpeg", || farcer::data::frames::check_ffmpeg().is_ok()),
        meld_middle_frames_short_broken_and_missing_clips
            .needs("ffmpeg", || farcer::data::frames::check_ffmpeg().is_ok()),
    ])
}
