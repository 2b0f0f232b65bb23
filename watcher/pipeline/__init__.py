"""One document's trip, one module per stage, in the order it takes them: `claim`,
`fetch`, `decode` (with the PDF's own `textlayer`), `recognise` (the engine, page by
page, kept in `checkpoint`s for long documents), `result`, `publish`, `settle`; `fate`
says once what a failure means, `callbacks` tells a consumer, `budget` bounds the pages
in flight, and `document` strings the stages together."""
