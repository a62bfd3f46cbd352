//! The loss-curve PNG written at the end of training: a title with the run's name, labelled axes
//! (step, loss) with their ranges, the training loss raw (light) and smoothed (dark), the eval loss
//! as dots, and a legend. Text is drawn with a built-in 3x5 pixel font (no font files).

use std::path::Path;

use crate::error::{Error, Result};

const W: usize = 800;
const H: usize = 480;
const MARGIN: usize = 60;
const RAW: [u8; 3] = [174, 199, 232];
const SMOOTH: [u8; 3] = [31, 119, 180];
const EVAL: [u8; 3] = [255, 127, 14];
const INK: [u8; 3] = [0, 0, 0];
/// Weight of the running average of the smoothed curve (TensorBoard's smoothing slider).
const SMOOTHING: f64 = 0.9;

/// 3x5 glyphs (bit 4 the left column), letters in capitals.
fn glyph(ch: char) -> [u8; 5] {
    match ch.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        '/' => [1, 1, 2, 4, 4],
        '(' => [2, 4, 4, 4, 2],
        ')' => [2, 1, 1, 1, 2],
        '+' => [0, 2, 7, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        _ => [0; 5],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            self.set(x.round() as i64, y.round() as i64, c);
            self.set(x.round() as i64, y.round() as i64 + 1, c);
        }
    }
    fn dot(&mut self, (x, y): (f64, f64), c: [u8; 3]) {
        for dx in -3..=3 {
            for dy in -3..=3 {
                if dx * dx + dy * dy <= 9 {
                    self.set(x as i64 + dx, y as i64 + dy, c);
                }
            }
        }
    }
    /// `s` at (x, y) in the 3x5 font scaled 2x: 8 pixels a character.
    fn text(&mut self, x: usize, y: usize, s: &str) {
        for (k, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(
                                (x + k * 8 + col * 2 + dx) as i64,
                                (y + row * 2 + dy) as i64,
                                INK,
                            );
                        }
                    }
                }
            }
        }
    }
    /// A legend entry: a swatch of `c` and its label.
    fn legend(&mut self, x: usize, y: usize, c: [u8; 3], dot: bool, label: &str) {
        if dot {
            self.dot(((x + 8) as f64, (y + 4) as f64), c);
        } else {
            self.line(
                (x as f64, (y + 4) as f64),
                ((x + 16) as f64, (y + 4) as f64),
                c,
            );
        }
        self.text(x + 24, y, label);
    }
}

/// The exponential running average of `ys` (the first point kept, then `SMOOTHING` of the
/// previous average and the rest of the new value), as TensorBoard smooths scalars.
fn smoothed(ys: &[(usize, f64)]) -> Vec<(usize, f64)> {
    let mut avg = None;
    ys.iter()
        .map(|&(s, y)| {
            let a = match avg {
                None => y,
                Some(a) => SMOOTHING * a + (1.0 - SMOOTHING) * y,
            };
            avg = Some(a);
            (s, a)
        })
        .collect()
}

/// Writes `path`: the training loss `train` (step, loss) raw and smoothed, the eval loss `eval`
/// (step, loss) as dots, under `title`.
pub fn loss_curve(
    path: &Path,
    title: &str,
    train: &[(usize, f64)],
    eval: &[(usize, f64)],
) -> Result<()> {
    let train: Vec<(usize, f64)> = train
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite())
        .collect();
    let eval: Vec<(usize, f64)> = eval
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite())
        .collect();
    let (mut lo, mut hi, mut smax) = (f64::INFINITY, f64::NEG_INFINITY, 1usize);
    for &(s, l) in train.iter().chain(&eval) {
        lo = lo.min(l);
        hi = hi.max(l);
        smax = smax.max(s);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let (pw, ph) = ((W - 2 * MARGIN) as f64, (H - 2 * MARGIN) as f64);
    let at = |s: usize, l: f64| {
        (
            MARGIN as f64 + pw * s as f64 / smax as f64,
            MARGIN as f64 + ph * (1.0 - (l - lo) / (hi - lo)),
        )
    };
    let mut c = Canvas::new();
    let (left, right, bottom) = (MARGIN as f64, (W - MARGIN) as f64, (H - MARGIN) as f64);
    c.line((left, MARGIN as f64), (left, bottom), INK);
    c.line((left, bottom), (right, bottom), INK);
    c.text(MARGIN, 14, &format!("{title}: loss"));
    c.text(4, MARGIN - 4, &format!("{hi:.3}"));
    c.text(4, H - MARGIN - 6, &format!("{lo:.3}"));
    c.text(4, MARGIN + 20, "loss");
    c.text(MARGIN, H - MARGIN + 12, "0");
    c.text(W - MARGIN - 40, H - MARGIN + 12, &smax.to_string());
    c.text(W / 2 - 16, H - MARGIN + 28, "step");
    for (curve, color) in [(train.clone(), RAW), (smoothed(&train), SMOOTH)] {
        let pts: Vec<(f64, f64)> = curve.iter().map(|&(s, l)| at(s, l)).collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], color);
        }
    }
    for &(s, l) in &eval {
        c.dot(at(s, l), EVAL);
    }
    let (lx, ly) = (W - MARGIN - 200, MARGIN + 8);
    c.legend(lx, ly, RAW, false, "train");
    c.legend(lx, ly + 16, SMOOTH, false, "train, smoothed");
    if !eval.is_empty() {
        c.legend(lx, ly + 32, EVAL, true, "eval");
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| Error::Config(format!("png: {e}")))?;
        w.write_image_data(&c.px)
            .map_err(|e| Error::Config(format!("png: {e}")))?;
    }
    crate::io::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the PNG and counts the pixels of each color.
    fn colors(path: &Path) -> std::collections::HashMap<[u8; 3], usize> {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        let mut n = std::collections::HashMap::new();
        for px in buf.chunks(3) {
            *n.entry([px[0], px[1], px[2]]).or_default() += 1;
        }
        n
    }

    #[test]
    fn the_plot_has_raw_and_smoothed_training_loss_eval_dots_and_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("loss.png");
        let train: Vec<(usize, f64)> = (1..=200)
            .map(|s| (s, 3.0 / (s as f64).sqrt() + 0.3 * ((s % 7) as f64)))
            .collect();
        loss_curve(&p, "my-run", &train, &[(100, 1.0), (200, 0.6)]).unwrap();
        let n = colors(&p);
        // Two eval dots and the legend's (29 pixels each); lines and text are far more.
        for (what, c, least) in [
            ("raw", RAW, 500),
            ("smoothed", SMOOTH, 500),
            ("eval", EVAL, 87),
            ("text and axes", INK, 1000),
        ] {
            assert!(
                n.get(&c).copied().unwrap_or(0) >= least,
                "{what}: {:?}",
                n.get(&c)
            );
        }
        // Without an eval set there are no eval dots and no eval legend.
        loss_curve(&p, "my-run", &train, &[]).unwrap();
        assert_eq!(colors(&p).get(&EVAL), None);
    }

    #[test]
    fn smoothing_is_an_exponential_running_average() {
        let s = smoothed(&[(1, 1.0), (2, 0.0), (3, 0.0)]);
        assert_eq!(s[0], (1, 1.0));
        assert!((s[1].1 - 0.9).abs() < 1e-12 && (s[2].1 - 0.81).abs() < 1e-12);
    }
}
