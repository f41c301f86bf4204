//! A small line chart as PNG: the persona benchmark's satisfaction curves.
//!
//! Written here rather than with plotters: plotters needs a system font (or one
//! shipped with us) to draw any text, and this chart needs only a few labels, which
//! a built-in 5x7 bitmap font draws. The PNG itself is zlib-compressed scanlines
//! (flate2, already a dependency).

use std::io::Write;

/// One curve: y values in 0..=1, one per x = 1, 2, ...
pub struct Series {
    pub label: String,
    pub color: [u8; 3],
    pub dashed: bool,
    pub values: Vec<f64>,
}

/// Distinct colours for up to eight series (then they repeat).
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];

const WIDTH: usize = 1000;
const HEIGHT: usize = 540;
const LEFT: usize = 80;
const RIGHT: usize = 300;
const TOP: usize = 50;
const BOTTOM: usize = 70;
const SCALE: usize = 2;

struct Canvas {
    rgb: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            rgb: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < WIDTH && (y as usize) < HEIGHT {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line `width` pixels thick; dashed lines draw 8 pixels, skip 6.
    fn line(
        &mut self,
        (x0, y0): (i64, i64),
        (x1, y1): (i64, i64),
        c: [u8; 3],
        width: i64,
        dashed: bool,
    ) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err, mut step) = (x0, y0, dx + dy, 0u32);
        loop {
            if !dashed || step % 14 < 8 {
                for ox in 0..width {
                    for oy in 0..width {
                        self.set(x + ox, y + oy, c);
                    }
                }
            }
            step += 1;
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Upper-case text with the built-in font, top-left at (x, y).
    fn text(&mut self, x: usize, y: usize, text: &str, c: [u8; 3]) {
        for (k, ch) in text.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for oy in 0..SCALE {
                            for ox in 0..SCALE {
                                self.set(
                                    (x + k * 6 * SCALE + col * SCALE + ox) as i64,
                                    (y + r * SCALE + oy) as i64,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn text_width(text: &str) -> usize {
    text.chars().count() * 6 * SCALE
}

/// The chart: y from 0% to 100%, x from 1 to the longest series.
pub fn line_chart_png(title: &str, x_label: &str, series: &[Series]) -> Vec<u8> {
    let mut c = Canvas::new();
    let (x0, x1) = (LEFT as i64, (WIDTH - RIGHT) as i64);
    let (y0, y1) = ((HEIGHT - BOTTOM) as i64, TOP as i64);
    let grey = [210, 210, 210];
    let ink = [40, 40, 40];
    let n = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let px = |i: usize| x0 + ((x1 - x0) as f64 * i as f64 / (n - 1) as f64).round() as i64;
    let py = |v: f64| y0 - ((y0 - y1) as f64 * v.clamp(0.0, 1.0)).round() as i64;
    for q in 0..=4 {
        let v = q as f64 / 4.0;
        c.line((x0, py(v)), (x1, py(v)), grey, 1, false);
        let label = format!("{}%", q * 25);
        c.text(
            LEFT - 12 - text_width(&label),
            py(v) as usize - 7,
            &label,
            ink,
        );
    }
    let tick = match n {
        0..=20 => 5,
        21..=60 => 10,
        61..=200 => 25,
        _ => 100,
    };
    for x in (0..=n).step_by(tick).filter(|&x| x >= 1) {
        let at = px(x - 1);
        c.line((at, y0), (at, y0 + 6), ink, 1, false);
        let label = x.to_string();
        c.text(
            at as usize - text_width(&label) / 2,
            y0 as usize + 12,
            &label,
            ink,
        );
    }
    c.line((x0, y0), (x1, y0), ink, 2, false);
    c.line((x0, y0), (x0, y1), ink, 2, false);
    c.text(
        (LEFT + (x1 as usize - LEFT) / 2).saturating_sub(text_width(x_label) / 2),
        HEIGHT - 30,
        x_label,
        ink,
    );
    c.text(LEFT, 15, title, ink);
    for s in series {
        for i in 1..s.values.len() {
            c.line(
                (px(i - 1), py(s.values[i - 1])),
                (px(i), py(s.values[i])),
                s.color,
                2,
                s.dashed,
            );
        }
    }
    for (k, s) in series.iter().enumerate() {
        let y = (TOP + 10 + k * 24) as i64;
        let lx = x1 + 20;
        c.line((lx, y + 6), (lx + 30, y + 6), s.color, 3, s.dashed);
        c.text(lx as usize + 40, y as usize, &s.label, ink);
    }
    encode_png_rgb(WIDTH, HEIGHT, &c.rgb)
}

/// An RGB8 image as PNG (no filtering; zlib does the work).
pub fn encode_png_rgb(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((width * 3 + 1) * height);
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).expect("writing to memory");
    let idat = z.finish().expect("writing to memory");
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &idat), (b"IEND", &Vec::new())] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    out
}

/// 5x7 glyphs, one byte per row (low 5 bits); unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    match c {
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [30, 17, 17, 17, 17, 17, 30],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_of_the_chart_size() {
        let png = line_chart_png(
            "test",
            "sessions",
            &[Series {
                label: "a".into(),
                color: PALETTE[0],
                dashed: true,
                values: vec![0.0, 0.5, 1.0],
            }],
        );
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            WIDTH as u32
        );
        assert_eq!(
            u32::from_be_bytes(png[20..24].try_into().unwrap()),
            HEIGHT as u32
        );
        assert!(
            png.ends_with(&[0xAE, 0x42, 0x60, 0x82]),
            "IEND's CRC closes the file"
        );
    }
}
