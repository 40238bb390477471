"""`sae inspect`: what the latents of a trained SAE fire on, read from the store without running the model.

scan.py    the one streaming pass of the encoder over the cached activations (frequencies, means, histograms,
           top-N contexts and a uniform sample of firings per latent; several SAEs of a site share it)
topbuf.py  the bounded best-N buffer per latent, merged a batch at a time with tensor operations
lens.py    from weights alone: the logit lens (final norm + unembedding), decoder-cosine neighbours, token text
report.py  a latent's record (numbers, contexts as token texts and activations), shared by HTML and terminal
html.py    the static site: index.html (sortable, searchable) and latents/<id>.html
site.py    the command end to end: targets (a run or a sweep's members), token range, files written
"""
