"""Region-phrase localization data and evaluation (001 §4, Algorithm 1; SPEC §1, §4, §5).

    boxes      IoU (0-based exclusive pixel boxes; VOC / Flickr30K inclusive boxes convert exactly),
               merging a plural chain's boxes, labelling proposals (>= 0.7 positive, < 0.3 negative)
    entities   the Flickr30K Entities reader (Sentences/, Annotations/, split lists, proposals.parquet)
               -> `PhraseCorpus` of Arrow tables (images, captions, phrases, regions, proposals)
    synthetic  the shapes scenes written in that layout, with proposals, for offline runs
    sentences  a layout's captions as Karpathy-format image-caption data with the reader's ids (001 Eq. 8's
               image-sentence side on the same images and sentences)
    metrics    R@1/5/10 at IoU >= 0.5, the proposals' upper bound, the exact random R@1, and 001 Eq. 8
    sampling   Algorithm 1's per-batch masks: positive / negative regions per phrase, negative phrases

Everything here is pure (numpy / pyarrow, torch only for Eq. 8) and imports no trainer code.
"""

from itmatch.phrases.boxes import (HIT_IOU, NEGATIVE_IOU, POSITIVE_IOU, box_area, box_iou, enclosing_box,
                                   from_inclusive, label_proposals, merge_boxes, paired_iou, to_inclusive)
from itmatch.phrases.entities import PhraseCorpus, boxes_of, padded_proposals, read_entities, read_proposals
from itmatch.phrases.metrics import (combine_distances, localization_hits, localization_recall,
                                     phrase_localization_metrics, random_recall, region_phrase_distance)
from itmatch.phrases.sampling import algorithm1_masks, sample_positive_regions

__all__ = ["HIT_IOU", "NEGATIVE_IOU", "POSITIVE_IOU", "box_area", "box_iou", "enclosing_box", "from_inclusive",
           "label_proposals", "merge_boxes", "paired_iou", "to_inclusive", "PhraseCorpus", "boxes_of",
           "padded_proposals", "read_entities", "read_proposals", "combine_distances", "localization_hits",
           "localization_recall", "phrase_localization_metrics", "random_recall", "region_phrase_distance",
           "algorithm1_masks", "sample_positive_regions"]
