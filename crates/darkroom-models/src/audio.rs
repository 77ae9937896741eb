//! Audio in: any of WAV, MP3, FLAC, OGG/Vorbis and M4A/AAC at any sample rate and channel count, decoded with
//! symphonia, mixed down to mono and resampled (windowed sinc) to the rate a model wants.

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Decoded mono audio.
#[derive(Debug, Clone)]
pub struct Pcm {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Pcm {
    pub fn duration(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate.max(1) as f64
    }
}

/// Decodes a whole file to mono f32. `ext` (from the file name or content type) helps the format probe. The error
/// is a sentence for the caller's 422.
pub fn decode(bytes: Vec<u8>, ext: Option<&str>) -> Result<Pcm, String> {
    if bytes.is_empty() {
        return Err("the audio file is empty".into());
    }
    let mss = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes)), Default::default());
    let mut hint = Hint::new();
    if let Some(e) = ext {
        hint.with_extension(e);
    }
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &FormatOptions::default(), &MetadataOptions::default())
        .map_err(|e| format!("not a supported audio file (WAV, MP3, FLAC, OGG/Vorbis, M4A/AAC): {e}"))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or("the file holds no audio track")?;
    let track_id = track.id;
    let mut rate = track.codec_params.sample_rate.unwrap_or(0);
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| format!("unsupported audio codec: {e}"))?;
    let mut out = Vec::new();
    let mut buf: Option<SampleBuffer<f32>> = None;
    let mut bad_packets = 0usize;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => return Err(format!("the audio file is damaged: {e}")),
        };
        if packet.track_id() != track_id {
            continue;
        }
        match decoder.decode(&packet) {
            Ok(decoded) => {
                let spec = *decoded.spec();
                rate = spec.rate;
                let channels = spec.channels.count().max(1);
                let need = decoded.capacity() as u64;
                if buf.as_ref().is_none_or(|b| (b.capacity() as u64) < need * channels as u64) {
                    buf = Some(SampleBuffer::<f32>::new(need, spec));
                }
                let b = buf.as_mut().expect("set above");
                b.copy_interleaved_ref(decoded);
                let s = b.samples();
                if channels == 1 {
                    out.extend_from_slice(s);
                } else {
                    out.extend(s.chunks_exact(channels).map(|f| f.iter().sum::<f32>() / channels as f32));
                }
            }
            Err(SymError::DecodeError(_)) => {
                bad_packets += 1;
                if bad_packets > 100 {
                    return Err("the audio file is damaged: too many undecodable packets".into());
                }
            }
            Err(e) => return Err(format!("the audio could not be decoded: {e}")),
        }
    }
    if rate == 0 {
        return Err("the audio file does not say its sample rate".into());
    }
    if out.is_empty() {
        return Err("the audio file holds no samples".into());
    }
    Ok(Pcm { samples: out, sample_rate: rate })
}

/// Resamples with a Blackman-windowed sinc (32 zero crossings), low-passed at the lower Nyquist rate. Sample rates
/// are integers, so output sample `n` lies at input position `n·from/to`, whose fractional part takes only
/// `to / gcd(from, to)` values (320 for 22.05 → 16 kHz): the filter's taps are computed once per phase, and each
/// output sample is one dot product (the direct form evaluated three trigonometric functions per tap).
pub fn resample(pcm: &Pcm, to: u32) -> Pcm {
    if pcm.sample_rate == to || pcm.samples.is_empty() {
        return Pcm { samples: pcm.samples.clone(), sample_rate: to };
    }
    let (from, to64) = (pcm.sample_rate as u64, to as u64);
    let g = gcd(from, to64);
    let (up, down) = (to64 / g, from / g);
    let filter = SincFilter::new(pcm.sample_rate, to);
    let x = &pcm.samples;
    if up as usize * (2.0 * filter.half + 2.0) as usize > 1 << 22 {
        return resample_direct(pcm, to);
    }
    // Phase p: output at input position i0 + p/up; its taps are inputs i0 + j for j in j0 ..= j0 + len - 1.
    let phases: Vec<(isize, Vec<f64>, f64)> = (0..up)
        .map(|p| {
            let frac = p as f64 / up as f64;
            let j0 = (frac - filter.half).ceil() as isize;
            let j1 = (frac + filter.half).floor() as isize;
            let w: Vec<f64> = (j0..=j1).map(|j| filter.weight(j as f64 - frac)).collect();
            let sum = w.iter().sum();
            (j0, w, sum)
        })
        .collect();
    let n_out = ((x.len() as f64) * filter.ratio).round() as usize;
    let last = x.len() as isize - 1;
    let out = (0..n_out as u64)
        .map(|n| {
            let num = n * down;
            let (i0, (j0, w, sum)) = ((num / up) as isize, &phases[(num % up) as usize]);
            let lo = i0 + j0;
            let hi = lo + w.len() as isize - 1;
            let (a, b) = (lo.max(0), hi.min(last));
            if a > b {
                return 0.0;
            }
            let taps = &w[(a - lo) as usize..=(b - lo) as usize];
            let acc: f64 = x[a as usize..=b as usize].iter().zip(taps).map(|(&v, &w)| v as f64 * w).sum();
            // Whole windows use the phase's precomputed sum; windows cut by the ends are normalised by their own.
            let norm = if a == lo && b == hi { *sum } else { taps.iter().sum() };
            if norm.abs() > 1e-12 { (acc / norm) as f32 } else { 0.0 }
        })
        .collect();
    Pcm { samples: out, sample_rate: to }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The resampling filter: a sinc low-passed at `cutoff` (of the input's Nyquist rate) under a Blackman window
/// `half` input samples wide on each side.
struct SincFilter {
    ratio: f64,
    cutoff: f64,
    half: f64,
}

impl SincFilter {
    fn new(from: u32, to: u32) -> Self {
        let ratio = to as f64 / from as f64;
        let cutoff = ratio.min(1.0) * 0.97; // relative to the input's Nyquist
        SincFilter { ratio, cutoff, half: 32.0 / cutoff } // taps on each side, in input samples
    }

    /// The weight of an input `d` samples from the output's position.
    fn weight(&self, d: f64) -> f64 {
        let s = if d.abs() < 1e-9 {
            1.0
        } else {
            let a = std::f64::consts::PI * d * self.cutoff;
            a.sin() / a
        };
        let p = (d + self.half) / (2.0 * self.half); // 0..1 across the window
        s * (0.42 - 0.5 * (2.0 * std::f64::consts::PI * p).cos() + 0.08 * (4.0 * std::f64::consts::PI * p).cos())
    }
}

/// [`resample`] evaluating the filter at every tap (rates whose phase table would be too large).
fn resample_direct(pcm: &Pcm, to: u32) -> Pcm {
    let filter = SincFilter::new(pcm.sample_rate, to);
    let x = &pcm.samples;
    let n_out = ((x.len() as f64) * filter.ratio).round() as usize;
    let mut out = Vec::with_capacity(n_out);
    for n in 0..n_out {
        let t = n as f64 / filter.ratio; // position in input samples
        let lo = ((t - filter.half).ceil().max(0.0)) as usize;
        let hi = ((t + filter.half).floor() as usize).min(x.len() - 1);
        let (mut acc, mut norm) = (0.0f64, 0.0f64);
        for (k, &v) in x.iter().enumerate().take(hi + 1).skip(lo) {
            let w = filter.weight(k as f64 - t);
            acc += v as f64 * w;
            norm += w;
        }
        out.push(if norm.abs() > 1e-12 { (acc / norm) as f32 } else { 0.0 });
    }
    Pcm { samples: out, sample_rate: to }
}

/// A 16-bit PCM mono WAV file from samples in [-1, 1] (clamped).
pub fn wav_bytes(samples: &[f32], rate: u32) -> Vec<u8> {
    let pcm: Vec<i16> = samples.iter().map(|s| (s.clamp(-1.0, 1.0) * 32767.0).round() as i16).collect();
    wav_i16(&pcm, rate)
}

/// A 16-bit PCM mono WAV file: the 44-byte header, then the samples.
pub fn wav_i16(samples: &[i16], rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut v = Vec::with_capacity(44 + data_len as usize);
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data_len).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // PCM
    v.extend_from_slice(&1u16.to_le_bytes()); // mono
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * 2).to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, secs: f64, hz: f64) -> Vec<f32> {
        (0..(rate as f64 * secs) as usize)
            .map(|i| (2.0 * std::f64::consts::PI * hz * i as f64 / rate as f64).sin() as f32 * 0.5)
            .collect()
    }

    #[test]
    fn wav_round_trip_and_resampling_keep_a_tone() {
        let x = tone(44_100, 0.5, 440.0);
        let pcm = decode(wav_bytes(&x, 44_100), Some("wav")).unwrap();
        assert_eq!(pcm.sample_rate, 44_100);
        assert_eq!(pcm.samples.len(), x.len());
        let r = resample(&pcm, 16_000);
        assert_eq!(r.samples.len(), 8000);
        // Compare with the tone computed at 16 kHz, away from the edges.
        let want = tone(16_000, 0.5, 440.0);
        let err: f32 = (200..7800).map(|i| (r.samples[i] - want[i]).abs()).fold(0.0, f32::max);
        assert!(err < 0.01, "{err}");
        // A tone above the new Nyquist rate is filtered out, not folded back.
        let high = Pcm { samples: tone(44_100, 0.5, 12_000.0), sample_rate: 44_100 };
        let r = resample(&high, 16_000);
        let rms = (r.samples[200..7800].iter().map(|v| v * v).sum::<f32>() / 7600.0).sqrt();
        assert!(rms < 0.02, "{rms}");
    }

    /// The phase-table resampler computes what the direct form computes, edges included, down and up.
    #[test]
    fn the_phase_table_resampler_equals_the_direct_form() {
        let noise: Vec<f32> =
            (0..9000u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0) - 0.5).collect();
        for (from, to) in [(22_050, 16_000), (44_100, 16_000), (8_000, 16_000), (48_000, 22_050), (16_001, 16_000)] {
            let pcm = Pcm { samples: noise.clone(), sample_rate: from };
            let (fast, direct) = (resample(&pcm, to), resample_direct(&pcm, to));
            assert_eq!(fast.samples.len(), direct.samples.len(), "{from} → {to}");
            let err = fast.samples.iter().zip(&direct.samples).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err < 1e-6, "{from} → {to}: {err}");
        }
    }

    /// 1 s of a 440 Hz tone at 44.1 kHz stereo, encoded by FFmpeg (through PyAV) as MP3, AAC in M4A, FLAC and
    /// Vorbis in OGG (tests/fixtures).
    #[test]
    fn decodes_mp3_m4a_flac_and_ogg() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in ["tone.mp3", "tone.m4a", "tone.flac", "tone.ogg"] {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            // The probe finds the format by content alone, too.
            for hint in [name.rsplit('.').next(), None] {
                let pcm = decode(bytes.clone(), hint).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(pcm.sample_rate, 44_100, "{name}");
                assert!((0.95..1.15).contains(&pcm.duration()), "{name}: {} s", pcm.duration());
                let r = resample(&pcm, 16_000);
                // Count rising zero crossings in the middle half second: 440 Hz gives ~220.
                let mid = &r.samples[4000..12000];
                let ups = mid.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
                assert!((215..=225).contains(&ups), "{name}: {ups} crossings");
                let rms = (mid.iter().map(|v| v * v).sum::<f32>() / mid.len() as f32).sqrt();
                assert!((0.25..0.32).contains(&rms), "{name}: rms {rms}");
            }
        }
    }

    #[test]
    fn bad_audio_is_a_clear_error() {
        assert!(decode(vec![], None).unwrap_err().contains("empty"));
        assert!(decode(b"this is not audio at all".to_vec(), None).unwrap_err().contains("not a supported audio"));
        let mut wav = wav_bytes(&[], 16_000);
        wav.truncate(44);
        assert!(decode(wav, Some("wav")).is_err());
    }
}
