//! Which tokens carry loss.
//!
//! Two methods:
//! - **spans** (the default): the parts of a row that are trained are known as byte ranges of
//!   the rendered text (a prompt template's `completion` block, the assistant turns of a chat);
//!   a token is a target when its offsets overlap such a range. The mask therefore never depends
//!   on how a template string happens to tokenize in context.
//! - **response template** (TRL's `DataCollatorForCompletionOnlyLM`, copied from TRL 0.12.2): the
//!   token ids of a response template (and, for multi-turn data, an instruction template) are
//!   searched in the example's token ids.

use std::ops::Range;

/// `mask[i]` is true when token `i` (byte range `offsets[i]`) overlaps one of `spans` (sorted,
/// not overlapping). A zero-width token counts when it sits inside a span.
pub fn mask_from_spans(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<bool> {
    let spans: Vec<&Range<usize>> = spans.iter().filter(|r| r.start < r.end).collect();
    let mut mask = vec![false; offsets.len()];
    let mut k = 0;
    for (i, &(s, e)) in offsets.iter().enumerate() {
        // Token starts are non-decreasing, so spans that end before this token never matter again.
        while k < spans.len() && spans[k].end <= s {
            k += 1;
        }
        if let Some(sp) = spans.get(k) {
            mask[i] = if s == e { sp.start <= s } else { sp.start < e };
        }
    }
    mask
}

/// What the response-template search found in one example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TemplateSearch {
    /// The response template occurs nowhere (TRL warns and masks the whole example).
    pub response_missing: bool,
    /// Multi-turn: the instruction template occurs nowhere (TRL masks the whole example).
    pub instruction_missing: bool,
}

fn matches_at(labels: &[Option<u32>], at: usize, pat: &[u32]) -> bool {
    at + pat.len() <= labels.len()
        && labels[at..at + pat.len()]
            .iter()
            .zip(pat)
            .all(|(l, p)| *l == Some(*p))
}

fn find_all(labels: &[Option<u32>], pat: &[u32]) -> Vec<usize> {
    if pat.is_empty() {
        return Vec::new();
    }
    (0..labels.len())
        .filter(|&i| matches_at(labels, i, pat))
        .collect()
}

/// TRL 0.12.2's `DataCollatorForCompletionOnlyLM.torch_call` on one example: labels start as
/// the ids with every `pad_id` masked (so with pad == EOS every EOS loses its label, as in TRL);
/// single-turn, everything up to the end of the *last* response template is masked; multi-turn,
/// each instruction template start is paired with the next response template end and the
/// stretch between is masked (index 0 is prepended when the example opens with a response);
/// a missing template masks everything.
pub fn response_template_mask(
    ids: &[u32],
    pad_id: Option<u32>,
    response: &[u32],
    instruction: Option<&[u32]>,
) -> (Vec<bool>, TemplateSearch) {
    let mut labels: Vec<Option<u32>> = ids
        .iter()
        .map(|&t| if Some(t) == pad_id { None } else { Some(t) })
        .collect();
    let mut found = TemplateSearch::default();
    let n = labels.len();
    match instruction {
        None => {
            let last = find_all(&labels, response).last().copied();
            match last {
                None => {
                    found.response_missing = true;
                    labels.iter_mut().for_each(|l| *l = None);
                }
                Some(start) => {
                    let end = (start + response.len()).min(n);
                    labels[..end].iter_mut().for_each(|l| *l = None);
                }
            }
        }
        Some(instruction) => {
            let ends: Vec<usize> = find_all(&labels, response)
                .into_iter()
                .map(|i| i + response.len())
                .collect();
            if ends.is_empty() {
                found.response_missing = true;
                labels.iter_mut().for_each(|l| *l = None);
            }
            // As in TRL, searched in the labels as they are now (all masked if no response).
            let mut starts = find_all(&labels, instruction);
            if starts.is_empty() {
                found.instruction_missing = true;
                labels.iter_mut().for_each(|l| *l = None);
            }
            if !starts.is_empty() && !ends.is_empty() && starts[0] > ends[0] {
                starts.insert(0, 0);
            }
            for (k, (&start, &end)) in starts.iter().zip(&ends).enumerate() {
                let end = end.min(n);
                let from = if k == 0 { 0 } else { start.min(end) };
                labels[from..end].iter_mut().for_each(|l| *l = None);
            }
            if ends.len() < starts.len() {
                let from = *starts.last().expect("non-empty");
                labels[from.min(n)..].iter_mut().for_each(|l| *l = None);
            }
        }
    }
    (labels.iter().map(Option::is_some).collect(), found)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn spans_select_overlapping_tokens() {
        // "ab|cd|ef" with the span covering "d" and "e" (bytes 3..5): tokens 1 and 2.
        let offs = [(0, 2), (2, 4), (4, 6)];
        assert_eq!(mask_from_spans(&offs, &[3..5]), vec![false, true, true]);
        assert_eq!(
            mask_from_spans(&offs, &[0..1, 5..6]),
            vec![true, false, true]
        );
        assert_eq!(mask_from_spans(&offs, &[2..2]), vec![false, false, false]);
        assert_eq!(
            mask_from_spans(&[(0, 1), (1, 1), (1, 3)], &[1..2]),
            vec![false, true, true]
        );
        assert_eq!(mask_from_spans(&offs, &[]), vec![false; 3]);
    }

    #[test]
    fn response_template_single_and_multi_turn() {
        // ids: 9 R R 5 6 R R 7 (R R = response template [1, 2])
        let ids = [9, 1, 2, 5, 6, 1, 2, 7];
        let (m, f) = response_template_mask(&ids, Some(0), &[1, 2], None);
        assert_eq!(
            m,
            vec![false, false, false, false, false, false, false, true]
        );
        assert_eq!(f, TemplateSearch::default());
        let (m, f) = response_template_mask(&ids, Some(0), &[3], None);
        assert!(m.iter().all(|&x| !x) && f.response_missing);
        // Multi-turn: H=8; 8 1 2 5 8 6 1 2 7 → train 5 and 7.
        let ids = [8, 1, 2, 5, 8, 6, 1, 2, 7];
        let (m, _) = response_template_mask(&ids, None, &[1, 2], Some(&[8]));
        assert_eq!(
            m,
            vec![false, false, false, true, false, false, false, false, true]
        );
        // Pad ids never carry loss.
        let (m, _) = response_template_mask(&[1, 2, 5, 0], Some(0), &[1, 2], None);
        assert_eq!(m, vec![false, false, true, false]);
    }
}
