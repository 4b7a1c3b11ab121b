"""Split hygiene: is anything of the validation or test split already in training?

Two kinds of leak make a held-out score look better (or, with a conflicting label, worse)
than it is: one patient on both sides of a split, and one picture on both sides. COVID-CT
was scraped from paper figures, so the same picture can sit in two papers, or in both
classes. This module finds both: patients from the ids the datasets ship, pictures from
their content (a byte hash, a hash of the decoded pixels, and a perceptual hash whose
close pairs are confirmed by keypoints that agree on one crop-and-scale transform).

Measured on the real data (see ``reports/audit/report.md``):

* pHash must be taken on the image **trimmed to the body**: padding a picture with 10 %
  black border moves the 256-bit pHash of the untrimmed image by 46-154 bits, of the
  trimmed one by 0-8.
* The 64-bit pHash cannot separate: two different COVID-CT images are 6 bits apart, as
  close as a true duplicate. The 256-bit one puts the same picture at 10-24 bits and the
  nearest different picture at 46, unrelated lung-set slices at 66 and more.
* A crop into the body is beyond any pHash threshold (a cropped copy of a COVID-CT figure
  sits at 40, between two same-patient slices at 46-52); ORB keypoints agreeing on one
  similarity transform (RANSAC) separate it: 241-655 inliers for the same picture, at most
  54 for anything else.

Modules: ``fingerprints`` (hashes of a picture), ``pairs`` (the same picture across splits),
``patients`` (patient ids and links), ``audit`` (one dataset's audit, the leak verdict), ``report``.
"""
