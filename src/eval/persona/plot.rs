//! Learning curves as a PNG: one or more panels of (x, y) series that share their
//! axes' meaning and one legend, drawn with plotters.
//!
//! Nothing here knows about personas: a benchmark turns its runs into a [`Chart`]
//! (the persona benchmark's is [`super::metrics::satisfaction_chart`]) and
//! [`render_png`] draws it. Text is drawn with ab_glyph from DejaVu Sans compiled
//! into the binary (the `dejavu` crate), so a chart needs no system font and no
//! fontconfig; plotters renders into an RGB buffer and [`encode_png_rgb`] writes
//! the PNG (flate2), so plotters' image encoder is not built either.
//!
//! The legend sits to the right of the panels, as wide as its longest label and as
//! tall as its entries: the image grows to fit it, so a label is never cut off.

use std::io::Write;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One curve.
#[derive(Clone, Debug)]
pub struct Series {
    /// Its legend entry; series with the same label, colour and dash (in several
    /// panels) share one.
    pub label: String,
    pub color: [u8; 3],
    pub dashed: bool,
    /// (x, y), in x order.
    pub points: Vec<(f64, f64)>,
}

/// One set of axes.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// A figure: panels in a grid, with the same axis titles and y range, and one legend.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// The y axis' range; x runs over the points' range (at least 1 wide).
    pub y_range: (f64, f64),
    /// Write y ticks as percentages (y = 1 is 100%).
    pub y_percent: bool,
    pub panels: Vec<Panel>,
}

/// Distinct colours (Tableau 10 less its grey, which [`GREY`] is for).
pub const PALETTE: [[u8; 3]; 9] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [188, 189, 34],
    [23, 190, 207],
];

/// The colour of a baseline or control.
pub const GREY: [u8; 3] = [110, 110, 110];

const FONT: &str = "sans-serif";
const PANEL_W: u32 = 620;
const PANEL_H: u32 = 400;
const TITLE_H: u32 = 44;
const LEGEND_PAD: u32 = 24;
const SWATCH_W: u32 = 36;
const LEGEND_ROW: u32 = 26;
const LEGEND_FONT: f64 = 17.0;

fn font(size: f64) -> FontDesc<'static> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The crate ships the upstream DejaVuSans.ttf, which parses; were it not
        // to, every text draw would fail and render_png return that error (the
        // tests draw text, so it would not go unnoticed).
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
    (FONT, size).into_font()
}

/// The width and height in pixels `text` takes at `size`.
fn text_size(text: &str, size: f64) -> (u32, u32) {
    font(size)
        .box_size(text)
        .unwrap_or((text.chars().count() as u32 * size as u32, size as u32))
}

/// The legend's entries: one per distinct (label, colour, dash), in order of
/// first appearance, the dashed ones last.
fn legend_entries(chart: &Chart) -> Vec<&Series> {
    let mut entries: Vec<&Series> = Vec::new();
    for s in chart.panels.iter().flat_map(|p| &p.series) {
        if !entries
            .iter()
            .any(|e| e.label == s.label && e.color == s.color && e.dashed == s.dashed)
        {
            entries.push(s);
        }
    }
    let (solid, dashed): (Vec<&Series>, Vec<&Series>) =
        entries.into_iter().partition(|s| !s.dashed);
    solid.into_iter().chain(dashed).collect()
}

/// The image's size for `chart`: (width, height, columns, rows, legend width).
fn layout(chart: &Chart) -> (u32, u32, u32, u32, u32) {
    let n = chart.panels.len().max(1) as u32;
    let cols = match n {
        1 => 1,
        2..=4 => 2,
        _ => 3,
    };
    let rows = n.div_ceil(cols);
    let entries = legend_entries(chart);
    let label_w = entries
        .iter()
        .map(|s| text_size(&s.label, LEGEND_FONT).0)
        .max()
        .unwrap_or(0);
    let legend_w = match entries.is_empty() {
        true => 0,
        false => LEGEND_PAD + SWATCH_W + 10 + label_w + LEGEND_PAD,
    };
    let legend_h = TITLE_H + LEGEND_PAD + entries.len() as u32 * LEGEND_ROW + LEGEND_PAD;
    let width = cols * PANEL_W + legend_w;
    let height = (TITLE_H + rows * PANEL_H).max(legend_h);
    (width, height, cols, rows, legend_w)
}

/// Draws `chart` and returns it as a PNG.
pub fn render_png(chart: &Chart) -> Result<Vec<u8>> {
    let (width, height, cols, rows, legend_w) = layout(chart);
    let mut rgb = vec![255u8; width as usize * height as usize * 3];
    draw(chart, &mut rgb, (width, height), (cols, rows), legend_w)
        .map_err(|e| anyhow!("drawing the chart: {e}"))?;
    Ok(encode_png_rgb(width as usize, height as usize, &rgb))
}

fn draw(
    chart: &Chart,
    rgb: &mut [u8],
    (width, height): (u32, u32),
    (cols, rows): (u32, u32),
    legend_w: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let ink = RGBColor(40, 40, 40);
    let root = BitMapBackend::with_buffer(rgb, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(TITLE_H);
    let (title, size) = fit(&chart.title, width.saturating_sub(32), 22.0);
    head.draw(&Text::new(title, (16, 12), font(size).color(&ink)))?;
    let (grid, legend) = body.split_horizontally(width - legend_w);
    let grid = grid.shrink((0, 0), (cols * PANEL_W, rows * PANEL_H));
    let areas = grid.split_evenly((rows as usize, cols as usize));
    for (panel, area) in chart.panels.iter().zip(&areas) {
        draw_panel(chart, panel, area)?;
    }
    for (k, s) in legend_entries(chart).iter().enumerate() {
        let y = (LEGEND_PAD + k as u32 * LEGEND_ROW) as i32;
        let x = LEGEND_PAD as i32;
        let (_, text_h) = text_size(&s.label, LEGEND_FONT);
        let mid = y + text_h as i32 / 2 + 1;
        let style = ShapeStyle::from(&rgb_color(s.color)).stroke_width(3);
        let swatch = vec![(x, mid), (x + SWATCH_W as i32, mid)];
        match s.dashed {
            true => legend.draw(&DashedPathElement::new(swatch, 7, 5, style))?,
            false => legend.draw(&PathElement::new(swatch, style))?,
        }
        legend.draw(&Text::new(
            s.label.clone(),
            (x + SWATCH_W as i32 + 10, y),
            font(LEGEND_FONT).color(&ink),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// `text` at the largest size from `size` down to 12 that fits in `width`
/// pixels, cut short with an ellipsis if even 12 does not.
fn fit(text: &str, width: u32, size: f64) -> (String, f64) {
    let mut size = size;
    while size > 12.0 && text_size(text, size).0 > width {
        size -= 1.0;
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = text.to_string();
    let mut n = chars.len();
    while n > 1 && text_size(&out, size).0 > width {
        n -= 1;
        out = format!("{}…", chars[..n].iter().collect::<String>().trim_end());
    }
    (out, size)
}

fn rgb_color([r, g, b]: [u8; 3]) -> RGBColor {
    RGBColor(r, g, b)
}

/// The x range of every panel: all the points', at least 1 wide.
fn x_range(chart: &Chart) -> (f64, f64) {
    let xs = chart
        .panels
        .iter()
        .flat_map(|p| &p.series)
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    match lo.is_finite() {
        true => (lo, hi.max(lo + 1.0)),
        false => (0.0, 1.0),
    }
}

fn draw_panel(
    chart: &Chart,
    panel: &Panel,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error>> {
    let ink = RGBColor(40, 40, 40);
    let (x0, x1) = x_range(chart);
    let (y0, y1) = chart.y_range;
    let (title, size) = fit(&panel.title, area.dim_in_pixel().0.saturating_sub(32), 18.0);
    let mut ctx = ChartBuilder::on(area)
        .caption(title, font(size).color(&ink))
        .margin(12)
        .margin_right(24)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let percent = |v: &f64| format!("{:.0}%", v * 100.0);
    let plain = |v: &f64| format!("{v}");
    let y_fmt: &dyn Fn(&f64) -> String = match chart.y_percent {
        true => &percent,
        false => &plain,
    };
    let whole = |v: &f64| match v.fract() == 0.0 {
        true => format!("{v:.0}"),
        false => format!("{v:.1}"),
    };
    ctx.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&whole)
        .y_label_formatter(y_fmt)
        .label_style(font(14.0).color(&ink))
        .axis_desc_style(font(15.0).color(&ink))
        .axis_style(ink)
        .bold_line_style(RGBColor(220, 220, 220))
        .light_line_style(WHITE)
        .draw()?;
    // Dashed series (controls, baselines) last: their gaps show what they cross.
    let (solid, dashed): (Vec<&Series>, Vec<&Series>) =
        panel.series.iter().partition(|s| !s.dashed);
    for s in solid.into_iter().chain(dashed) {
        let style = ShapeStyle::from(&rgb_color(s.color)).stroke_width(2);
        match s.dashed {
            true => ctx.draw_series(DashedLineSeries::new(s.points.clone(), 8, 6, style))?,
            false => ctx.draw_series(LineSeries::new(s.points.clone(), style))?,
        };
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PNG with the png crate: (width, height, RGB8 pixels).
    fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .expect("a PNG header");
        let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
        let info = reader.next_frame(&mut buf).expect("a PNG frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn series(label: &str, color: [u8; 3], dashed: bool, ys: &[f64]) -> Series {
        Series {
            label: label.into(),
            color,
            dashed,
            points: ys
                .iter()
                .enumerate()
                .map(|(i, &y)| ((i + 1) as f64, y))
                .collect(),
        }
    }

    fn chart(panels: Vec<Panel>) -> Chart {
        Chart {
            title: "test".into(),
            x_label: "session".into(),
            y_label: "satisfied".into(),
            y_range: (0.0, 1.0),
            y_percent: true,
            panels,
        }
    }

    #[test]
    fn one_panel_decodes_at_its_layout_size() {
        let c = chart(vec![Panel {
            title: "a".into(),
            series: vec![series("a", PALETTE[0], true, &[0.0, 0.5, 1.0])],
        }]);
        let (w, h, ..) = layout(&c);
        let png = render_png(&c).unwrap();
        let (dw, dh, rgb) = decode(&png);
        assert_eq!((dw, dh), (w, h));
        assert!(w > PANEL_W && h >= TITLE_H + PANEL_H, "{w}x{h}");
        assert_eq!(rgb.len(), (w * h * 3) as usize);
    }

    #[test]
    fn a_long_legend_fits_and_is_drawn() {
        let long =
            "one-paragraph combined, seed 1 (a label much longer than the old legend allowed)";
        let c = chart(vec![
            Panel {
                title: "one-paragraph".into(),
                series: vec![
                    series(long, PALETTE[0], false, &[0.0, 0.25, 0.5, 0.75]),
                    series("off (control)", GREY, true, &[0.0, 0.0, 0.1, 0.0]),
                ],
            },
            Panel {
                title: "brief".into(),
                series: vec![
                    series(long, PALETTE[0], false, &[0.1, 0.2, 0.8, 1.0]),
                    series("off (control)", GREY, true, &[0.0, 0.0, 0.0, 0.0]),
                ],
            },
        ]);
        assert_eq!(legend_entries(&c).len(), 2, "shared labels share an entry");
        let (w, h, cols, rows, legend_w) = layout(&c);
        assert_eq!((cols, rows), (2, 1));
        let label_w = text_size(long, LEGEND_FONT).0;
        assert!(label_w > 500, "the font measures text: {label_w}");
        assert_eq!(legend_w, LEGEND_PAD + SWATCH_W + 10 + label_w + LEGEND_PAD);
        let (dw, dh, rgb) = decode(&render_png(&c).unwrap());
        assert_eq!((dw, dh), (w, h));
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            let mut n = 0;
            for y in y0..y1 {
                for x in x0..x1 {
                    let i = ((y * w + x) * 3) as usize;
                    n += usize::from(rgb[i..i + 3].iter().all(|&c| c < 128));
                }
            }
            n
        };
        // The first entry's text: ink at its start and in its last tenth, and the
        // label's right end is inside the image with the padding to spare.
        let text_x = cols * PANEL_W + LEGEND_PAD + SWATCH_W + 10;
        let (y0, y1) = (TITLE_H + LEGEND_PAD, TITLE_H + LEGEND_PAD + LEGEND_ROW);
        assert!(dark(text_x, text_x + 40, y0, y1) > 20, "the label's start");
        let end = text_x + label_w;
        assert!(
            dark(end - label_w / 10, end, y0, y1) > 20,
            "the label's end"
        );
        assert!(end + LEGEND_PAD <= w);
        assert_eq!(dark(end + 4, w, y0, y1), 0, "nothing past the label");
        // The second entry (the dashed control) has its swatch and text.
        let (y0, y1) = (y1, y1 + LEGEND_ROW);
        assert!(
            dark(text_x, text_x + 40, y0, y1) > 20,
            "the control's label"
        );
        let sx = cols * PANEL_W + LEGEND_PAD;
        let grey = (y0..y1)
            .flat_map(|y| (sx..sx + SWATCH_W).map(move |x| ((y * w + x) * 3) as usize))
            .filter(|&i| rgb[i..i + 3] == GREY)
            .count();
        assert!(grey > 20, "the control's dashed swatch: {grey}");
    }

    #[test]
    fn a_title_too_long_for_its_panel_is_shrunk_then_cut_short() {
        let short = "brief: answers under 40 words";
        assert_eq!(fit(short, 500, 18.0), (short.to_string(), 18.0));
        let long = "direct: starts with the answer itself (no \"Sure!\", \"Certainly\", greetings)";
        let (text, size) = fit(long, 500, 18.0);
        assert!(
            (12.0..18.0).contains(&size) && text == long,
            "{size} {text}"
        );
        assert!(text_size(&text, size).0 <= 500);
        let (text, size) = fit(long, 150, 18.0);
        assert_eq!(size, 12.0);
        assert!(text.ends_with('…') && long.starts_with(text.trim_end_matches('…')));
        assert!(text_size(&text, size).0 <= 150, "{text}");
    }

    #[test]
    fn an_empty_chart_still_draws() {
        let png = render_png(&chart(vec![])).unwrap();
        let (w, h, _) = decode(&png);
        assert_eq!((w, h), (PANEL_W, TITLE_H + PANEL_H));
    }
}
