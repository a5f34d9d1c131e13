//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// cudaEvent is a CUDA event without timing on the backend's stream.
type cudaEvent struct {
	c  *CUDA
	ev C.kv_event
}

// NewEvent creates an event (not while capturing a graph).
func (c *CUDA) NewEvent() (Event, error) {
	if !c.need("event", !c.closed, "%s used after Close", c.name) ||
		!c.need("event", !c.capturing, "cannot create an event while capturing a CUDA graph") {
		return nil, c.err
	}
	e := &cudaEvent{c: c}
	c.run("event", func() C.kv_status { return C.kv_event_create(&e.ev) })
	if c.err != nil {
		return nil, c.err
	}
	return e, nil
}

// Record marks the work enqueued on the stream so far.
func (e *cudaEvent) Record() {
	c := e.c
	if !c.need("event", e.ev != nil, "event used after Close") ||
		!c.need("event", !c.capturing, "cannot record an event while capturing a CUDA graph") {
		return
	}
	c.run("event", func() C.kv_status { return C.kv_event_record(e.ev, c.stream) })
}

// Wait blocks until the recorded work has run; asynchronous errors of any
// work before it surface here, as with Sync.
func (e *cudaEvent) Wait() error {
	c := e.c
	if e.ev == nil || c.capturing {
		c.need("event", false, "event waited on after Close or while capturing")
		return c.err
	}
	c.run("event", func() C.kv_status { return C.kv_event_sync(e.ev) })
	return c.err
}

// Close destroys the event; safe to call twice.
func (e *cudaEvent) Close() error {
	if e.ev == nil {
		return nil
	}
	var s C.kv_status
	e.c.run("event", func() C.kv_status { s = C.kv_event_destroy(e.ev); return s })
	e.ev = nil
	if s != 0 {
		return cudaError("event", s, "destroy")
	}
	return nil
}
