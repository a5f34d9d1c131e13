//go:build cuda

package gpu

/*
#include "kvalign.h"
*/
import "C"

// CopyBandwidth measures the card's device-to-device copy bandwidth, in GB/s
// of bytes read plus bytes written, over 20 copies of a buffer of bytes.
func (c *CUDA) CopyBandwidth(bytes int) (float64, error) {
	var gbps C.float
	c.run("copy-bandwidth", func() C.kv_status { return C.kv_copy_bandwidth(c.stream, C.longlong(bytes), 20, &gbps) })
	return float64(gbps), c.Sync()
}
