// Package eval measures bounded-cache generation: teacher-forced scoring and
// perplexity, latency, readability; it writes results as tables and files.
package eval

import (
	"fmt"
	"io"
	"os"
	"time"
)

// Progress draws a one-line progress bar with an ETA on a terminal and
// stays quiet otherwise (logs, pipes, CI).
type Progress struct {
	w           io.Writer
	label       string
	total, done int
	start, last time.Time
	on          bool
}

// NewProgress makes a bar for total units on w (shown only if w is a terminal).
func NewProgress(w io.Writer, label string, total int) *Progress {
	on := false
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			on = true
		}
	}
	return &Progress{w: w, label: label, total: total, start: time.Now(), on: on}
}

// Add records n more units done.
func (p *Progress) Add(n int) {
	p.done += n
	if !p.on || time.Since(p.last) < 200*time.Millisecond && p.done < p.total {
		return
	}
	p.last = time.Now()
	frac := float64(p.done) / float64(max(p.total, 1))
	el := time.Since(p.start)
	eta := "?"
	if frac > 0 {
		eta = (time.Duration(float64(el)/frac) - el).Round(time.Second).String()
	}
	const width = 30
	bar := make([]byte, width)
	for i := range bar {
		bar[i] = ' '
		if float64(i) < frac*width {
			bar[i] = '='
		}
	}
	fmt.Fprintf(p.w, "\r%s [%s] %d/%d %3.0f%% ETA %s ", p.label, bar, p.done, p.total, 100*frac, eta)
}

// Done ends the bar's line.
func (p *Progress) Done() {
	if p.on {
		fmt.Fprintf(p.w, "\r%s done: %d in %s\033[K\n", p.label, p.done, time.Since(p.start).Round(time.Millisecond))
	}
}
