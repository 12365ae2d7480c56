//! Incrementality: a second run over an unchanged tree does nothing, and
//! small changes (one paragraph, a rename, a touch) only recompute what the
//! content-addressed embedding cache cannot provide.

mod common;

use std::fs;

use common::{
    FlowConfig, Rng, Workspace, expected_computed, export_diff, paragraph, parse_export, sources,
};

/// The multi-chunk document the edit test works on.
const GUIDE: &str = "guide.md";

/// A tree with one long document (many chunks at chunk_size 300) and a few
/// small ones, already indexed once.
fn indexed_workspace() -> (Workspace, Vec<String>) {
    let ws = Workspace::new(FlowConfig::with_chunks(300, 50));
    let mut rng = Rng::new(7);
    let guide: Vec<String> = (0..10).map(|_| paragraph(&mut rng, 40)).collect();
    ws.write(GUIDE, render("Guide", &guide));
    ws.write("a.md", render("Alpha", &[paragraph(&mut rng, 30)]));
    ws.write("b.txt", paragraph(&mut rng, 25));
    ws.write("sub/c.md", render("Gamma", &[paragraph(&mut rng, 20)]));
    let first = ws.index();
    first.assert_clean();
    assert_eq!(first.n("items.new"), 4, "{}", first.0);
    (ws, guide)
}

fn render(title: &str, paras: &[String]) -> String {
    format!("# {title}\n\n{}\n", paras.join("\n\n"))
}

/// Raw export lines whose row does not come from `source`.
fn lines_not_from(export: &str, source: &str) -> Vec<String> {
    export
        .lines()
        .zip(parse_export(export))
        .filter(|(_, row)| row.source != source)
        .map(|(line, _)| line.to_string())
        .collect()
}

#[test]
fn second_run_over_unchanged_tree_is_a_noop() {
    let (ws, _) = indexed_workspace();
    let before = ws.export();
    assert!(!before.is_empty(), "first run exported nothing");

    let again = ws.index();
    again.assert_clean();
    assert_eq!(again.n("embeddings.computed"), 0, "{}", again.0);
    for counter in [
        "rows.added",
        "rows.updated",
        "rows.deleted",
        "items.new",
        "items.modified",
        "items.deleted",
    ] {
        assert_eq!(again.n(counter), 0, "{counter}: {}", again.0);
    }
    assert_eq!(again.n("items.seen"), 4, "{}", again.0);
    assert_eq!(
        again.n("items.unchanged"),
        again.n("items.seen"),
        "{}",
        again.0
    );
    assert_eq!(
        again.n("rows.total"),
        parse_export(&before).len() as u64,
        "{}",
        again.0
    );
    let after = ws.export();
    assert!(after == before, "{}", export_diff(&before, &after));
}

#[test]
fn editing_one_paragraph_recomputes_only_the_new_chunks() {
    let (ws, mut guide) = indexed_workspace();
    let before = ws.export();
    let before_rows = parse_export(&before);
    let guide_chunks = before_rows.iter().filter(|r| r.source == GUIDE).count();
    assert!(
        guide_chunks >= 5,
        "the guide should span many chunks, got {guide_chunks}"
    );

    // Change one paragraph near the end: the leading chunks stay identical.
    guide[8] = "Completely rewritten paragraph about zeppelins and marmalade.".into();
    ws.write(GUIDE, render("Guide", &guide));
    let run = ws.index();
    run.assert_clean();
    let after = ws.export();
    let after_rows = parse_export(&after);

    let computed = run.n("embeddings.computed");
    assert_eq!(
        computed,
        expected_computed(&before_rows, &after_rows) as u64,
        "computed must equal the number of new distinct chunk texts: {}",
        run.0
    );
    assert!(computed > 0, "the edit produced new text: {}", run.0);
    let new_guide_chunks = after_rows.iter().filter(|r| r.source == GUIDE).count() as u64;
    assert!(
        computed < new_guide_chunks,
        "only the chunks around the edit should be embedded again \
         ({computed} computed for {new_guide_chunks} chunks): {}",
        run.0
    );
    assert!(run.n("rows.unchanged") > 0, "{}", run.0);
    assert_eq!(run.n("items.modified"), 1, "{}", run.0);
    assert_eq!(run.n("items.unchanged"), 3, "{}", run.0);
    assert_eq!(run.n("rows.total"), after_rows.len() as u64, "{}", run.0);

    // Rows of the other files are untouched, byte for byte.
    assert_eq!(
        lines_not_from(&before, GUIDE),
        lines_not_from(&after, GUIDE)
    );
    let fresh = ws.fresh_export();
    assert!(after == fresh, "{}", export_diff(&fresh, &after));
}

#[test]
fn rename_reuses_every_embedding() {
    let (ws, _) = indexed_workspace();
    let before = parse_export(&ws.export());
    fs::create_dir_all(ws.src().join("moved")).expect("mkdir");
    fs::rename(ws.src().join("a.md"), ws.src().join("moved/alpha.md")).expect("rename");

    let run = ws.index();
    run.assert_clean();
    assert_eq!(run.n("embeddings.computed"), 0, "{}", run.0);
    assert_eq!(run.n("items.new"), 1, "{}", run.0);
    assert_eq!(run.n("items.deleted"), 1, "{}", run.0);
    assert_eq!(run.n("items.unchanged"), 3, "{}", run.0);

    let export = ws.export();
    let after = parse_export(&export);
    let texts_of = |rows: &[common::Row], src: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r.source == src)
            .map(|r| r.text.clone())
            .collect()
    };
    assert_eq!(
        texts_of(&before, "a.md"),
        texts_of(&after, "moved/alpha.md")
    );
    assert!(!sources(&after).contains("a.md"), "old path still exported");
    let fresh = ws.fresh_export();
    assert!(export == fresh, "{}", export_diff(&fresh, &export));
}

#[test]
fn rewriting_identical_content_computes_nothing() {
    let (ws, _) = indexed_workspace();
    let before = ws.export();
    // Same bytes, new mtime.
    let content = fs::read(ws.src().join("a.md")).expect("read");
    ws.write("a.md", content);

    let run = ws.index();
    run.assert_clean();
    assert_eq!(run.n("embeddings.computed"), 0, "{}", run.0);
    for counter in ["rows.added", "rows.updated", "rows.deleted"] {
        assert_eq!(run.n(counter), 0, "{counter}: {}", run.0);
    }
    assert_eq!(ws.export(), before);
}

/// Many files sharing paragraphs span several processing batches (the first batches are
/// small and the preparer runs ahead of the writer): a text shared across batches is still
/// embedded exactly once, and a second run reuses everything.
#[test]
fn shared_chunks_across_batches_are_embedded_once() {
    let ws = Workspace::new(FlowConfig::with_chunks(120, 0));
    let mut rng = Rng::new(11);
    let shared: Vec<String> = (0..5).map(|_| paragraph(&mut rng, 12)).collect();
    for i in 0..700 {
        let own = paragraph(&mut rng, 12);
        let common = &shared[i % shared.len()];
        ws.write(
            format!("d{}/f{i:04}.md", i % 7),
            format!("{own}\n\n{common}\n"),
        );
    }
    let first = ws.index();
    first.assert_clean();
    let export = ws.export();
    let rows = parse_export(&export);
    let distinct = expected_computed(&[], &rows);
    assert!(distinct < rows.len(), "the corpus shares chunks");
    assert_eq!(
        first.n("embeddings.computed") as usize,
        distinct,
        "each distinct chunk text embedded once: {}",
        first.0
    );
    assert_eq!(
        (first.n("embeddings.computed") + first.n("embeddings.reused")) as usize,
        rows.len(),
        "{}",
        first.0
    );
    assert_eq!(export, ws.fresh_export());
    let again = ws.index();
    assert_eq!(again.n("embeddings.computed"), 0, "{}", again.0);
}
