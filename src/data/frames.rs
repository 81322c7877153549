//! Video frames with `ffmpeg`, one per utterance, as the authors took them:
//! MELD: the middle of the utterance's own clip (clips of 0.5 s or less at t = 0);
//! IEMOCAP: (start + end) / 2 of the dialogue video, the speaker's half of the split
//! screen with the top and bottom fifth cut off. A clip that cannot be read gives no
//! frame and is counted, never a crash. Frames are written once and reused.

use super::{iemocap, meld, Dataset};
use crate::error::{Error, Result};
use crate::limits::{check_file, InputLimits, MAX_CLIP_BYTES_VAR};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// A rectangle as ffmpeg's crop filter takes it (expressions of `iw`, `ih`).
#[derive(Debug, Clone, PartialEq)]
pub struct Crop(pub String);

impl Crop {
    /// IEMOCAP: the left or right half, without the top and bottom fifth.
    pub fn speaker_half(left: bool) -> Crop {
        Crop(format!(
            "crop=iw/2:ih*3/5:{}:ih/5",
            if left { "0" } else { "iw/2" }
        ))
    }
}

/// Fails with advice when ffmpeg is missing.
pub fn check_ffmpeg() -> Result<()> {
    for tool in ["ffmpeg", "ffprobe"] {
        let ok = Command::new(tool)
            .arg("-version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(Error::msg(format!(
                "`{tool}` was not found: install ffmpeg (Debian/Ubuntu: `apt-get install ffmpeg`; `scripts/setup` does it)"
            )));
        }
    }
    Ok(())
}

/// Duration of a media file in seconds.
pub fn probe_duration(path: &Path) -> std::result::Result<f64, String> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "default=noprint_wrappers=1:nokey=1",
        ])
        .arg(path)
        .output()
        .map_err(|e| format!("ffprobe: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .map_err(|_| {
            format!(
                "no duration ({})",
                String::from_utf8_lossy(&out.stdout).trim()
            )
        })
}

/// Writes the frame at `t` seconds (optionally cropped) as PNG to `out`, atomically.
pub fn extract_frame(
    video: &Path,
    t: f64,
    crop: Option<&Crop>,
    out: &Path,
) -> std::result::Result<(), String> {
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let tmp = crate::util::tmp_sibling(out).with_extension("png");
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-v", "error", "-ss", &format!("{t:.3}"), "-i"])
        .arg(video)
        .args(["-frames:v", "1"]);
    if let Some(c) = crop {
        cmd.args(["-vf", &c.0]);
    }
    let res = cmd
        .args(["-f", "image2", "-c:v", "png", "-y"])
        .arg(&tmp)
        .output()
        .map_err(|e| format!("ffmpeg: {e}"))?;
    let ok = res.status.success()
        && std::fs::metadata(&tmp)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
    if !ok {
        let _ = std::fs::remove_file(&tmp);
        let msg = String::from_utf8_lossy(&res.stderr).trim().to_string();
        return Err(if msg.is_empty() {
            "no frame decoded".into()
        } else {
            msg
        });
    }
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}

/// The frame of a clip the authors' way: the middle, or t = 0 for clips of 0.5 s or
/// less; when seeking to the middle yields nothing (broken index), t = 0 again.
pub fn middle_frame(
    clip: &Path,
    out: &Path,
    crop: Option<&Crop>,
) -> std::result::Result<(), String> {
    let d = probe_duration(clip)?;
    let t = if d > 0.5 { d / 2.0 } else { 0.0 };
    match extract_frame(clip, t, crop, out) {
        Ok(()) => Ok(()),
        Err(_) if t > 0.0 => extract_frame(clip, 0.0, crop, out),
        Err(e) => Err(e),
    }
}

/// What a frame job did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct FrameReport {
    pub utterances: usize,
    pub written: usize,
    pub reused: usize,
    pub missing_clip: usize,
    pub unreadable: usize,
    /// Up to 20 examples of failures: (clip, reason).
    pub examples: Vec<(String, String)>,
}

impl FrameReport {
    /// An error when there were utterances but not one frame exists now (every clip
    /// missing or unreadable: most likely the wrong video folder); `videos` is named.
    pub fn check_any(&self, videos: &Path) -> Result<()> {
        if self.utterances == 0 || self.written + self.reused > 0 {
            return Ok(());
        }
        let example = self
            .examples
            .first()
            .map(|(c, why)| format!(", e.g. {c}: {why}"))
            .unwrap_or_default();
        Err(Error::input(
            videos.display().to_string(),
            format!(
                "no frame could be made for any of the {} utterances ({} clips missing, {} unreadable{example}); check the video folder",
                self.utterances, self.missing_clip, self.unreadable
            ),
        ))
    }

    fn fail(&mut self, clip: &Path, why: String, missing: bool) {
        if missing {
            self.missing_clip += 1;
        } else {
            self.unreadable += 1;
        }
        if self.examples.len() < 20 {
            self.examples.push((clip.display().to_string(), why));
        }
    }
}

/// A frame to make: the video, the time (None: middle), the crop, and the output.
#[derive(Debug, Clone)]
pub struct Job {
    pub video: PathBuf,
    pub time: Option<f64>,
    pub crop: Option<Crop>,
    pub out: PathBuf,
}

/// Why a clip cannot be used, and whether it is missing (rather than unusable): only
/// regular files within `limits.max_clip_bytes` go to ffmpeg.
fn check_clip(clip: &Path, limits: &InputLimits) -> std::result::Result<(), (String, bool)> {
    check_file(clip, limits.max_clip_bytes, MAX_CLIP_BYTES_VAR)
        .map(|_| ())
        .map_err(|why| (why, !clip.exists()))
}

/// Runs frame jobs on `threads` ffmpeg processes at a time.
pub fn run_jobs(
    jobs: Vec<Job>,
    threads: usize,
    limits: &InputLimits,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> FrameReport {
    let total = jobs.len();
    let queue = Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
    let report = Mutex::new(FrameReport {
        utterances: total,
        ..Default::default()
    });
    let done = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let Some((_, job)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let r = if job.out.is_file() {
                    Ok(true)
                } else if let Err(e) = check_clip(&job.video, limits) {
                    Err(e)
                } else {
                    let res = match job.time {
                        Some(t) => extract_frame(&job.video, t, job.crop.as_ref(), &job.out),
                        None => middle_frame(&job.video, &job.out, job.crop.as_ref()),
                    };
                    res.map(|_| false).map_err(|e| (e, false))
                };
                {
                    let mut rep = report.lock().unwrap();
                    match r {
                        Ok(true) => rep.reused += 1,
                        Ok(false) => rep.written += 1,
                        Err((why, missing)) => rep.fail(&job.video, why, missing),
                    }
                }
                let mut d = done.lock().unwrap();
                *d += 1;
                progress(*d, total);
            });
        }
    });
    report.into_inner().unwrap()
}

/// Where a MELD split's clips are: `video_dir` may be MELD.Raw's root (with
/// `train_splits/` ...) or the split's own clip folder.
pub fn meld_clip(video_dir: &Path, split: &str, dia: &str, utt: &str) -> PathBuf {
    let name = format!("dia{dia}_utt{utt}.mp4");
    let nested = video_dir.join(meld::clip_folder(split)).join(&name);
    if nested.is_file() || video_dir.join(meld::clip_folder(split)).is_dir() {
        nested
    } else {
        video_dir.join(name)
    }
}

/// Frame jobs for a MELD split (frames under `out/frames/{split}/`).
pub fn meld_jobs(ds: &Dataset, video_dir: &Path, out: &Path) -> Vec<Job> {
    let mut jobs = Vec::new();
    for d in &ds.dialogues {
        for u in &d.utterances {
            jobs.push(Job {
                video: meld_clip(video_dir, &ds.split, &d.id, &u.id),
                time: None,
                crop: None,
                out: out.join(meld::frame_rel_path(&ds.split, &d.id, &u.id)),
            });
        }
    }
    jobs
}

/// Frame jobs for every IEMOCAP turn (frames under `out/frames/{dialogue}/{turn}.png`).
pub fn iemocap_jobs(sessions: &[iemocap::Session], out: &Path) -> Vec<Job> {
    let mut jobs = Vec::new();
    for s in sessions {
        for u in &s.dialogue.utterances {
            let (Some(a), Some(b), Some(video)) = (u.start, u.end, u.clip.clone()) else {
                continue;
            };
            let left = u.speaker.starts_with(s.left_speaker);
            jobs.push(Job {
                video,
                time: Some((a + b) / 2.0),
                crop: Some(Crop::speaker_half(left)),
                out: iemocap::frame_path(&out.join("frames"), &s.dialogue.id, &u.id),
            });
        }
    }
    jobs
}

/// For utterances of one's own data that name a `clip` but no `image`: extracts the frame
/// (middle of the clip, or (start + end) / 2 when times are given) into `cache_dir`
/// (named by the clip's path and time, so it is made once) and sets `image`. Returns the
/// clips that could not be read.
pub fn resolve_clip_frames(
    ds: &mut Dataset,
    cache_dir: &Path,
    limits: &InputLimits,
) -> Vec<(PathBuf, String)> {
    let mut failed = Vec::new();
    for d in &mut ds.dialogues {
        for u in &mut d.utterances {
            if u.image.is_some() {
                continue;
            }
            let Some(clip) = u.clip.clone() else { continue };
            let time = match (u.start, u.end) {
                (Some(a), Some(b)) => Some((a + b) / 2.0),
                _ => None,
            };
            let key = crate::util::sha256_bytes(format!("{}|{time:?}", clip.display()).as_bytes());
            let out = cache_dir.join(format!("{}.png", &key[..24]));
            let res = if out.is_file() {
                Ok(())
            } else if let Err((why, _)) = check_clip(&clip, limits) {
                Err(why)
            } else {
                match time {
                    Some(t) => extract_frame(&clip, t, None, &out),
                    None => middle_frame(&clip, &out, None),
                }
            };
            match res {
                Ok(()) => u.image = Some(out),
                Err(e) => failed.push((clip, e)),
            }
        }
    }
    failed
}
