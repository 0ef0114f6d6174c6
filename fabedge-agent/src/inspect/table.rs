//! Rendering `inspect` rows as an aligned text table or JSON; every
//! `inspect` subcommand, whichever module reads its map, goes through here.

use serde::Serialize;

/// A row type that renders as a table line.
pub trait Row: Serialize {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

pub fn table<R: Row>(rows: Vec<R>) -> (Vec<String>, Vec<Vec<String>>, serde_json::Value) {
    let headers = R::HEADERS.iter().map(|h| h.to_string()).collect();
    let cells = rows.iter().map(Row::cells).collect();
    let value = serde_json::to_value(&rows).unwrap_or(serde_json::Value::Null);
    (headers, cells, value)
}

pub fn print_table(headers: &[String], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers);
    for row in rows {
        line(row);
    }
    if rows.is_empty() {
        println!("(empty)");
    }
}
