//! Label text for the X/Y contact sheet: DejaVu Sans, rasterised by `ab_glyph` with
//! anti-aliasing.
//!
//! The font's bytes come from the `dejavu` crate (DejaVu 2.37, which ships upstream's LICENSE:
//! Bitstream Vera licence for the original glyphs, Arev licence for the Arev ones, DejaVu's own
//! changes public domain; free to embed and redistribute). DejaVu Sans covers Latin, Greek,
//! Cyrillic and many symbols. Text is laid out left to right with kerning and no shaping (no
//! ligatures, no Arabic joining, no right-to-left); a character the font lacks (CJK, emoji) or a
//! control character is drawn as U+FFFD `�`, so a missing glyph is visible rather than blank.
//!
//! This module measures, cuts (with `…`) and draws one line of text through a callback; it
//! knows nothing of grids or images.

use ab_glyph::{Font, FontRef, GlyphId, PxScale, ScaleFont, point};
use unicode_segmentation::UnicodeSegmentation;

/// Drawn for a character the font has no glyph for.
const REPLACEMENT: char = '\u{FFFD}';
/// Ends a label that was cut to fit.
const ELLIPSIS: &str = "…";

/// DejaVu Sans at one pixel size.
pub struct Face {
    font: FontRef<'static>,
    scale: PxScale,
}

impl Face {
    /// The face at `px` pixels per em.
    pub fn new(px: f32) -> Self {
        // The font's bytes are built into the binary and every test here parses them: parsing
        // cannot fail at run time.
        let font = FontRef::try_from_slice(dejavu::sans::regular())
            .expect("the embedded DejaVu Sans font parses");
        Self {
            font,
            scale: PxScale::from(px),
        }
    }

    /// Height of one line (ascent + descent), whole pixels.
    pub fn line_height(&self) -> usize {
        self.font.as_scaled(self.scale).height().ceil() as usize
    }

    fn glyph_id(&self, c: char) -> GlyphId {
        let id = if c.is_control() {
            GlyphId(0)
        } else {
            self.font.glyph_id(c)
        };
        // Glyph 0 is `.notdef`: the font lacks the character.
        if id.0 == 0 {
            self.font.glyph_id(REPLACEMENT)
        } else {
            id
        }
    }

    /// The glyphs of `s` with their pen positions (x, from the start of the line), and the
    /// line's advance width.
    fn layout(&self, s: &str) -> (Vec<(GlyphId, f32)>, f32) {
        let scaled = self.font.as_scaled(self.scale);
        let mut caret = 0.0;
        let mut prev: Option<GlyphId> = None;
        let mut out = Vec::new();
        for c in s.chars() {
            let id = self.glyph_id(c);
            if let Some(p) = prev {
                caret += scaled.kern(p, id);
            }
            out.push((id, caret));
            caret += scaled.h_advance(id);
            prev = Some(id);
        }
        (out, caret)
    }

    /// Width of `s` in pixels, rounded up.
    pub fn width(&self, s: &str) -> usize {
        self.layout(s).1.ceil() as usize
    }

    /// `s` whole if it fits in `max` pixels, else its longest prefix (whole graphemes) that
    /// fits with `…` after it; just `…`, or nothing, when even that does not fit.
    pub fn fit(&self, s: &str, max: usize) -> String {
        if self.width(s) <= max {
            return s.to_string();
        }
        let ends: Vec<usize> = s.grapheme_indices(true).map(|(i, _)| i).collect();
        // The widest cut that fits: widths grow with the prefix, so search.
        let fits = |n: usize| self.width(&format!("{}{ELLIPSIS}", &s[..ends[n]])) <= max;
        let (mut lo, mut hi) = (0, ends.len());
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if fits(mid) { lo = mid } else { hi = mid }
        }
        if fits(lo) {
            format!("{}{ELLIPSIS}", s[..ends[lo]].trim_end())
        } else {
            String::new()
        }
    }

    /// Draws `s` with its top-left corner at (`x0`, `y0`): `plot(x, y, coverage)` for each
    /// pixel with ink, coverage in 0..=1. Pixels left of or above the origin are skipped.
    pub fn draw(&self, x0: usize, y0: usize, s: &str, mut plot: impl FnMut(usize, usize, f32)) {
        let ascent = self.font.as_scaled(self.scale).ascent();
        let (glyphs, _) = self.layout(s);
        for (id, x) in glyphs {
            let glyph = id.with_scale_and_position(self.scale, point(x, ascent));
            let Some(outlined) = self.font.outline_glyph(glyph) else {
                continue; // a space: no outline
            };
            let b = outlined.px_bounds();
            outlined.draw(|gx, gy, c| {
                let x = x0 as i64 + b.min.x as i64 + i64::from(gx);
                let y = y0 as i64 + b.min.y as i64 + i64::from(gy);
                if x >= 0 && y >= 0 && c > 0.0 {
                    plot(x as usize, y as usize, c.min(1.0));
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ink(face: &Face, s: &str) -> Vec<(usize, usize, u8)> {
        let mut out = Vec::new();
        face.draw(0, 0, s, |x, y, c| out.push((x, y, (c * 255.0) as u8)));
        out
    }

    #[test]
    fn text_is_measured_and_drawn_within_its_box() {
        let face = Face::new(20.0);
        let (w, h) = (face.width("cfg 1.5"), face.line_height());
        assert!((40..100).contains(&w), "{w}");
        assert!((20..30).contains(&h), "{h}");
        let px = ink(&face, "cfg 1.5");
        assert!(px.len() > 50);
        assert!(px.iter().all(|&(x, y, _)| x <= w && y < h));
        // Anti-aliased: partial coverage at the edges, full in the stems.
        assert!(px.iter().any(|p| p.2 == 255) && px.iter().any(|p| p.2 > 0 && p.2 < 200));
    }

    #[test]
    fn long_labels_are_cut_with_an_ellipsis_at_grapheme_boundaries() {
        let face = Face::new(14.0);
        assert_eq!(face.fit("fox", 100), "fox");
        let long = "a red fox in a snowy forest at dawn, highly detailed";
        let cut = face.fit(long, 100);
        assert!(cut.ends_with('…') && cut.len() < long.len(), "{cut}");
        assert!(face.width(&cut) <= 100);
        assert!(long.starts_with(cut.trim_end_matches('…')));
        // `e` + combining acute stays whole.
        let accents = "e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}";
        let cut = face.fit(accents, face.width("e\u{301}e\u{301}…") + 1);
        assert_eq!(cut, "e\u{301}e\u{301}…");
        assert_eq!(face.fit(long, 3), "");
    }

    #[test]
    fn non_ascii_is_drawn_and_missing_glyphs_are_replaced() {
        let face = Face::new(20.0);
        // Greek, Cyrillic, accented Latin: real glyphs, not the replacement.
        for s in ["é", "λ", "ж", "ß"] {
            assert_ne!(
                face.glyph_id(s.chars().next().unwrap()),
                face.glyph_id(REPLACEMENT)
            );
            assert!(!ink(&face, s).is_empty(), "{s}");
        }
        // CJK and control characters: U+FFFD, which DejaVu has and which has ink.
        assert_ne!(face.font.glyph_id(REPLACEMENT).0, 0);
        assert_eq!(face.glyph_id('狐'), face.glyph_id(REPLACEMENT));
        assert_eq!(face.glyph_id('\n'), face.glyph_id(REPLACEMENT));
        assert_eq!(ink(&face, "狐"), ink(&face, "\u{FFFD}"));
        assert!(!ink(&face, "狐").is_empty());
    }
}
