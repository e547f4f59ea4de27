//! Figures a person can look at: a benchmark program's same-run numbers written
//! as `DIR/<name>.md` (its table as Markdown, with the command that produced it
//! and the date and machine) and `DIR/<name>.svg` (a chart of the same numbers).
//!
//! The charts are drawn with `plotters`' SVG backend only: text is written as
//! `<text>` elements, so no font files or system libraries are needed.
//!
//! A program takes `--figures DIR`, builds a [`Figure`] from the numbers it
//! printed and hands it to [`Figures::write`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Colour-blind-safe colours (Okabe–Ito), in series order: pgcachewatch first.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(230, 159, 0),   // orange
    RGBColor(0, 158, 115),   // green
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(204, 121, 167), // purple
    RGBColor(90, 90, 90),    // grey
    RGBColor(86, 180, 233),  // sky blue
];
const GREY: RGBColor = RGBColor(110, 110, 110);
const WIDTH: u32 = 1100;
const HEIGHT: u32 = 520;
const LEGEND_WIDTH: u32 = 400;
/// Font sizes below are plotters' (its SVG backend writes them at 1 / 1.24).
const FONT: &str = "sans-serif";

/// Where a program writes its figures, and what it records about the run.
pub struct Figures {
    dir: PathBuf,
    command: String,
    load_at_start: Option<String>,
}

impl Figures {
    /// Figures written into `dir` (created if missing). Call it when the program
    /// starts: it notes the command line and the machine's load before the run.
    pub fn new(dir: impl Into<PathBuf>) -> Figures {
        Figures {
            dir: dir.into(),
            command: command_line(),
            load_at_start: load_average(),
        }
    }

    /// `Some` when the program's arguments hold `--figures DIR` (or
    /// `--figures=DIR`), for programs that read their arguments by hand.
    pub fn from_args() -> Option<Figures> {
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            if a == "--figures" {
                return args.next().map(Figures::new);
            }
            if let Some(dir) = a.strip_prefix("--figures=") {
                return Some(Figures::new(dir));
            }
        }
        None
    }

    /// Writes `DIR/<name>.md` and `DIR/<name>.svg`; returns their paths.
    pub fn write(&self, figure: &Figure) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let md = self.dir.join(format!("{}.md", figure.name));
        let svg = self.dir.join(format!("{}.svg", figure.name));
        let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        let machine = machine(&figure.context);
        let load = self.load();
        let footer = [format!("{date} · {machine}"), load.clone()];
        match &figure.chart {
            Chart::Bars(bars) => draw_bars(&svg, &figure.title, &footer, bars),
            Chart::Cdf(cdf) => draw_cdf(&svg, &figure.title, &footer, cdf),
        }
        .with_context(|| format!("drawing {}", svg.display()))?;
        let machine = format!("{machine}; {load}");
        std::fs::write(&md, figure.markdown(&self.command, &date, &machine))
            .with_context(|| format!("writing {}", md.display()))?;
        println!("figures: wrote {} and {}", md.display(), svg.display());
        Ok((md, svg))
    }

    /// The machine's load before and after the run: on a small shared machine
    /// it says how far to trust the numbers.
    fn load(&self) -> String {
        match (&self.load_at_start, load_average()) {
            (Some(start), Some(end)) => {
                format!("load average (1/5/15 min) {start} at start, {end} at end")
            }
            (None, Some(end)) => format!("load average (1/5/15 min) {end} at end"),
            _ => "load average unknown".to_owned(),
        }
    }
}

/// Cores, CPU, memory, kernel, and whatever the program adds (e.g. the
/// PostgreSQL version).
fn machine(context: &[String]) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut parts = vec![format!("{cores} cores")];
    parts.extend(cpu_model());
    parts.extend(memory());
    parts.extend(kernel());
    parts.extend(context.iter().cloned());
    parts.join(", ")
}

/// Axis numbers without needless decimals: `6000`, `2.5`.
fn tick(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// One figure: its tables (the numbers the program printed) and its chart.
pub struct Figure {
    name: String,
    title: String,
    sections: Vec<(Option<String>, Table)>,
    notes: Vec<String>,
    context: Vec<String>,
    chart: Chart,
}

impl Figure {
    /// `name` is the files' stem; `title` heads the Markdown and the chart.
    pub fn new(name: &str, title: &str, chart: Chart) -> Figure {
        Figure {
            name: name.to_owned(),
            title: title.to_owned(),
            sections: Vec::new(),
            notes: Vec::new(),
            context: Vec::new(),
            chart,
        }
    }

    /// A table, under an optional heading.
    pub fn table(mut self, heading: Option<&str>, table: Table) -> Figure {
        self.sections.push((heading.map(str::to_owned), table));
        self
    }

    /// A line of text after the tables (a ratio, a target, a caveat).
    pub fn note(mut self, line: impl Into<String>) -> Figure {
        self.notes.push(line.into());
        self
    }

    /// Something about the set-up for the machine line, e.g. `PostgreSQL 16.4`.
    pub fn context(mut self, item: impl Into<String>) -> Figure {
        self.context.push(item.into());
        self
    }

    fn markdown(&self, command: &str, date: &str, machine: &str) -> String {
        let mut s = format!("# {}\n\n", self.title);
        let _ = writeln!(s, "![{}]({}.svg)\n", self.title, self.name);
        let _ = writeln!(s, "Produced by `{command}` on {date}.\n");
        let _ = writeln!(s, "Machine: {machine}.\n");
        for (heading, table) in &self.sections {
            if let Some(h) = heading {
                let _ = writeln!(s, "## {h}\n");
            }
            s.push_str(&table.markdown());
            s.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(s, "{note}\n");
        }
        // One trailing newline.
        while s.ends_with("\n\n") {
            s.pop();
        }
        s
    }
}

/// A table: the first column names the row and is left-aligned, the others
/// hold numbers and are right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: AsRef<str>>(header: &[S]) -> Table {
        Table {
            header: header.iter().map(|h| h.as_ref().to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        self.rows
            .push(cells.iter().map(|c| c.as_ref().to_owned()).collect());
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let mut s = line(&self.header);
        let align: Vec<String> = (0..self.header.len())
            .map(|i| if i == 0 { ":---" } else { "---:" }.to_owned())
            .collect();
        s.push_str(&format!("|{}|\n", align.join("|")));
        for row in &self.rows {
            s.push_str(&line(row));
        }
        s
    }
}

/// What a figure's SVG shows.
pub enum Chart {
    Bars(Bars),
    Cdf(Cdf),
}

/// Grouped bars: one group per x position (e.g. a client count), one bar per
/// series in each group (`None`: that series has no bar in that group).
pub struct Bars {
    pub x_label: String,
    pub y_label: String,
    pub groups: Vec<String>,
    pub series: Vec<(String, Vec<Option<f64>>)>,
    /// Decimals of the value written above each bar.
    pub decimals: usize,
}

/// Cumulative distributions, one line per series: x is the sample (log scale),
/// y the share of samples at or below it.
pub struct Cdf {
    pub x_label: String,
    pub series: Vec<(String, Vec<f64>)>,
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The canvas: the title on top, the machine's lines at the bottom, and the
/// plot and legend areas between them.
fn canvas<'a>(
    root: &Area<'a>,
    title: &str,
    footer: &[String],
) -> anyhow::Result<(Area<'a>, Area<'a>)> {
    root.fill(&WHITE)?;
    let (top, rest) = root.split_vertically(44);
    top.draw(&Text::new(
        title.to_owned(),
        (WIDTH as i32 / 2, 24),
        (FONT, 24)
            .into_font()
            .style(FontStyle::Bold)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    let line_height = 17;
    let (body, bottom) = rest.split_vertically(HEIGHT - 44 - 8 - line_height * footer.len() as u32);
    for (i, line) in footer.iter().enumerate() {
        bottom.draw(&Text::new(
            line.clone(),
            (10, line_height as i32 * i as i32 + 8),
            (FONT, 14)
                .into_font()
                .color(&GREY)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(body.split_horizontally(WIDTH - LEGEND_WIDTH))
}

/// A legend: one swatch (a filled square, or a line) and name per series.
fn legend(area: &Area, names: &[&str], lines: bool) -> anyhow::Result<()> {
    for (i, name) in names.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let y = 40 + 26 * i as i32;
        if lines {
            area.draw(&PathElement::new(
                vec![(10, y), (34, y)],
                color.stroke_width(3),
            ))?;
        } else {
            area.draw(&Rectangle::new([(14, y - 8), (30, y + 8)], color.filled()))?;
        }
        area.draw(&Text::new(
            (*name).to_owned(),
            (42, y),
            (FONT, 16)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

fn draw_bars(path: &Path, title: &str, footer: &[String], bars: &Bars) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let (plot, legend_area) = canvas(&root, title, footer)?;
    let top = bars
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .fold(0.0f64, f64::max);
    let groups = bars.groups.len().max(1);
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(56)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups as f64, 0f64..(top * 1.12).max(1e-9))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2)
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| tick(*v))
        .x_desc(bars.x_label.as_str())
        .y_desc(bars.y_label.as_str())
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 16))
        .draw()?;

    // Bars of a group share 80 % of its width; missing bars leave no gap.
    let value_style = (FONT, 15)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for g in 0..bars.groups.len() {
        let present: Vec<(usize, f64)> = bars
            .series
            .iter()
            .enumerate()
            .filter_map(|(s, (_, v))| v.get(g).copied().flatten().map(|v| (s, v)))
            .collect();
        let width = 0.8 / present.len().max(1) as f64;
        for (slot, &(s, v)) in present.iter().enumerate() {
            let x0 = g as f64 + 0.1 + slot as f64 * width;
            let color = PALETTE[s % PALETTE.len()];
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0 + width * 0.06, 0.0), (x0 + width * 0.94, v)],
                color.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{v:.*}", bars.decimals),
                (x0 + width / 2.0, v),
                value_style.clone(),
            )))?;
        }
        // The group's name under the axis, centred on the group.
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            bars.groups[g].clone(),
            (x, y + 8),
            (FONT, 17)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    let names: Vec<&str> = bars.series.iter().map(|(n, _)| n.as_str()).collect();
    legend(&legend_area, &names, false)?;
    root.present()?;
    Ok(())
}

fn draw_cdf(path: &Path, title: &str, footer: &[String], cdf: &Cdf) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let (plot, legend_area) = canvas(&root, title, footer)?;
    let all = cdf.series.iter().flat_map(|(_, v)| v.iter().copied());
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(1e-9);
    let hi = all.fold(0.0f64, f64::max).max(lo * 10.0);
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(56)
        .y_label_area_size(70)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc(cdf.x_label.as_str())
        .y_desc("updates at or below (%)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick(*v))
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 16))
        .draw()?;
    // The percentiles the tables give, as dashed guides.
    for p in [50.0, 90.0, 99.0] {
        chart.draw_series(DashedLineSeries::new(
            [(lo * 0.8, p), (hi * 1.25, p)],
            4,
            4,
            GREY.mix(0.6).stroke_width(1),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("p{p:.0}"),
            (lo * 0.82, p),
            (FONT, 15)
                .into_font()
                .color(&GREY)
                .pos(Pos::new(HPos::Left, VPos::Bottom)),
        )))?;
    }
    for (i, (_, samples)) in cdf.series.iter().enumerate() {
        let mut v = samples.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        // A step line: each sample lifts the share by 1/n.
        let mut points = Vec::with_capacity(v.len() * 2);
        for (k, &x) in v.iter().enumerate() {
            points.push((x, 100.0 * k as f64 / n));
            points.push((x, 100.0 * (k + 1) as f64 / n));
        }
        let color = PALETTE[i % PALETTE.len()];
        chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
    }
    let names: Vec<&str> = cdf.series.iter().map(|(n, _)| n.as_str()).collect();
    legend(&legend_area, &names, true)?;
    root.present()?;
    Ok(())
}

/// The command that produced the figures, as a person would type it.
fn command_line() -> String {
    let mut args = std::env::args();
    let bin = args
        .next()
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_stem)
        .map_or_else(|| "?".to_owned(), |s| s.to_string_lossy().into_owned());
    let rest: Vec<String> = args.map(|a| shell_quote(&a)).collect();
    let mut cmd = format!("cargo run --release -p pgcachewatch-bench --bin {bin}");
    if !rest.is_empty() {
        cmd.push_str(" -- ");
        cmd.push_str(&rest.join(" "));
    }
    cmd
}

fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./,=:@%+".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn cpu_model() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_owned())
}

fn memory() -> Option<String> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(format!("{:.0} GiB", kb / (1024.0 * 1024.0)))
}

fn kernel() -> Option<String> {
    let s = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    Some(format!("Linux {}", s.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_drop_needless_decimals() {
        assert_eq!(tick(6000.0), "6000");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn table_as_markdown() {
        let mut t = Table::new(&["name", "M/s"]);
        t.row(&["a | b", "1.00"]);
        assert_eq!(
            t.markdown(),
            "| name | M/s |\n|:---|---:|\n| a \\| b | 1.00 |\n"
        );
    }

    #[test]
    fn writes_both_files() {
        let dir = std::env::temp_dir().join(format!("pgcw-figures-{}", std::process::id()));
        let figures = Figures::new(&dir);
        let mut t = Table::new(&["clients", "x"]);
        t.row(&["2", "10"]);
        let bars = Figure::new(
            "bars",
            "Bars",
            Chart::Bars(Bars {
                x_label: "clients".into(),
                y_label: "tps".into(),
                groups: vec!["2".into(), "8".into()],
                series: vec![
                    ("x".into(), vec![Some(10.0), Some(12.0)]),
                    ("y".into(), vec![None, Some(3.0)]),
                ],
                decimals: 0,
            }),
        )
        .table(None, t)
        .note("a note");
        let (md, svg) = figures.write(&bars).unwrap();
        let md = std::fs::read_to_string(md).unwrap();
        assert!(md.contains("![Bars](bars.svg)"), "{md}");
        assert!(md.contains("| 2 | 10 |"), "{md}");
        assert!(md.contains("a note"), "{md}");
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.contains("<svg") && svg.contains("clients"), "{svg}");

        let cdf = Figure::new(
            "cdf",
            "Cdf",
            Chart::Cdf(Cdf {
                x_label: "µs".into(),
                series: vec![("a".into(), vec![100.0, 200.0, 150.0])],
            }),
        );
        let (_, svg) = figures.write(&cdf).unwrap();
        assert!(std::fs::read_to_string(svg).unwrap().contains("<polyline"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
