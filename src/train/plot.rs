//! A loss-curve PNG written at the end of training: training loss per step (blue) and eval loss
//! (orange dots), with the axis ranges printed in a tiny built-in pixel font (no font files).

use std::path::Path;

use crate::error::{Error, Result};

const W: usize = 800;
const H: usize = 480;
const MARGIN: usize = 60;

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
    /// 3x5 glyphs, scaled 2x, for digits and a few symbols.
    fn text(&mut self, x: usize, y: usize, s: &str) {
        for (k, ch) in s.chars().enumerate() {
            let g: [u8; 5] = match ch {
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
                '.' => [0, 0, 0, 0, 2],
                '-' => [0, 0, 7, 0, 0],
                'e' => [0, 7, 7, 4, 7],
                _ => [0; 5],
            };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(
                                (x + k * 8 + col * 2 + dx) as i64,
                                (y + row * 2 + dy) as i64,
                                [0, 0, 0],
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Writes `path` with `train` (step, loss) as a line and `eval` (step, loss) as dots.
pub fn loss_curve(path: &Path, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<()> {
    let all = train.iter().chain(eval).filter(|(_, l)| l.is_finite());
    let (mut lo, mut hi, mut smax) = (f64::INFINITY, f64::NEG_INFINITY, 1usize);
    for &(s, l) in all {
        lo = lo.min(l);
        hi = hi.max(l);
        smax = smax.max(s);
    }
    if !lo.is_finite() {
        lo = 0.0;
        hi = 1.0;
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
    let axis = [0, 0, 0];
    c.line(
        (MARGIN as f64, MARGIN as f64),
        (MARGIN as f64, (H - MARGIN) as f64),
        axis,
    );
    c.line(
        (MARGIN as f64, (H - MARGIN) as f64),
        ((W - MARGIN) as f64, (H - MARGIN) as f64),
        axis,
    );
    c.text(4, MARGIN - 4, &format!("{hi:.3}"));
    c.text(4, H - MARGIN - 6, &format!("{lo:.3}"));
    c.text(MARGIN, H - MARGIN + 12, "0");
    c.text(W - MARGIN - 40, H - MARGIN + 12, &smax.to_string());
    let pts: Vec<(f64, f64)> = train
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|&(s, l)| at(s, l))
        .collect();
    for w in pts.windows(2) {
        c.line(w[0], w[1], [31, 119, 180]);
    }
    for &(s, l) in eval.iter().filter(|(_, l)| l.is_finite()) {
        c.dot(at(s, l), [255, 127, 14]);
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
