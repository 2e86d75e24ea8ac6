//! `kiln star CELL... [--unstar] [--rating N]`: marks the keepers of a sweep, one `SetKeeper`
//! call per cell. What is starred is then found by the filter language (`kiln query 'starred'`,
//! `kiln fetch 'starred and rating >= 4'`); this module only sends and prints.

use kiln_proto::v1 as pb;

use crate::client::{Conn, status_error};

/// `kiln star --help` after the options.
pub const EXAMPLES: &str = "Cell ids are the CELL column of `kiln query`. Each cell is starred \
(or unstarred with --unstar); --rating gives it 1 to 5 stars, or 0 to clear its rating.\n\n\
Examples:\n  \
kiln star 17 18 42                       # keepers\n  \
kiln star 42 --rating 5                  # a keeper with five stars\n  \
kiln star 18 --unstar --rating 0         # not a keeper after all\n  \
kiln query 'sweep = \"foxes\" and starred' --sort -rating\n  \
kiln fetch 'starred and rating >= 4' -o best/";

/// How a cell's keeper state reads: `★ 4/5`, `★`, `4/5`, or nothing.
pub fn keeper_text(r: &pb::CellRecord) -> String {
    match (r.starred, r.rating) {
        (true, 0) => "★".into(),
        (true, n) => format!("★ {n}/5"),
        (false, 0) => String::new(),
        (false, n) => format!("{n}/5"),
    }
}

/// Stars (or unstars) each of `cells`, and rates them when `rating` is given. Stops at the
/// first cell the coordinator refuses; the cells before it are changed (and printed).
pub async fn star(
    conn: &Conn,
    cells: &[u64],
    unstar: bool,
    rating: Option<u32>,
) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    for &cell_id in cells {
        let r = c
            .set_keeper(pb::SetKeeperRequest {
                cell_id,
                starred: Some(!unstar),
                rating,
            })
            .await
            .map_err(|s| status_error(s).context(format!("cell {cell_id}")))?
            .into_inner();
        let shown = match keeper_text(&r) {
            s if s.is_empty() => "not starred".to_string(),
            s => s,
        };
        println!(
            "cell {} (sweep {} #{}): {shown}",
            r.cell_id, r.sweep_id, r.number
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeper_state_reads_as_stars() {
        let r = |starred, rating| pb::CellRecord {
            starred,
            rating,
            ..Default::default()
        };
        assert_eq!(keeper_text(&r(true, 0)), "★");
        assert_eq!(keeper_text(&r(true, 4)), "★ 4/5");
        assert_eq!(keeper_text(&r(false, 2)), "2/5");
        assert_eq!(keeper_text(&r(false, 0)), "");
    }
}
