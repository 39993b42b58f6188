package main

// Per-block fingerprints of a flat disk file, taken at snapshot time.
//
// The disk is cut into 64 KiB blocks (the last one may be shorter). A block
// that holds only zero bytes (a hole included) gets the all-zero fingerprint;
// any other block gets the first 16 bytes of the SHA-256 of its content,
// never all zero. Two points in time of a disk differ in a block exactly when
// the block's content differs (up to a 2^-128 collision), so changed areas
// never miss a change; rewriting a block with the same bytes is not reported
// (real CBT would report it: a harmless false positive there, absent here).

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"syscall"
)

const (
	blockSize = 64 << 10 // granularity of the emulated CBT
	sumSize   = 16       // bytes kept per block
)

// Linux lseek(2) whence values; os.File.Seek passes whence through as is.
const (
	seekData = 3
	seekHole = 4
)

type blockSums struct {
	capacity int64
	sums     []byte // sumSize bytes per block; all zero for a zero block
}

func (b *blockSums) blocks() int64 { return int64(len(b.sums) / sumSize) }

// sum returns block i's fingerprint; blocks past the end (a disk that has
// grown since) count as zero blocks.
func (b *blockSums) sum(i int64) []byte {
	if i < 0 || i >= b.blocks() {
		return zeroSum[:]
	}
	return b.sums[i*sumSize : (i+1)*sumSize]
}

func (b *blockSums) isZero(i int64) bool { return string(b.sum(i)) == string(zeroSum[:]) }

var zeroSum [sumSize]byte

// fingerprintFile reads the flat file up to capacity. Bytes past the end of
// the file read as zeros, and so do holes, which are skipped without reading
// (test disks are large and mostly sparse).
func fingerprintFile(name string, capacity int64) (*blockSums, error) {
	nblocks := (capacity + blockSize - 1) / blockSize
	out := &blockSums{capacity: capacity, sums: make([]byte, nblocks*sumSize)}

	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()

	buf := make([]byte, blockSize)
	for _, r := range dataRanges(f, capacity) {
		for i := r[0] / blockSize; i*blockSize < r[1]; i++ {
			if !out.isZero(i) {
				continue // already read as part of an earlier range
			}
			start := i * blockSize
			n := int64(blockSize)
			if start+n > capacity {
				n = capacity - start
			}
			got, err := f.ReadAt(buf[:n], start)
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, err
			}
			for j := got; j < int(n); j++ {
				buf[j] = 0
			}
			if allZero(buf[:n]) {
				continue
			}
			h := sha256.Sum256(buf[:n])
			if string(h[:sumSize]) == string(zeroSum[:]) {
				h[0] = 1 // keep the all-zero value for zero blocks only
			}
			copy(out.sums[i*sumSize:], h[:sumSize])
		}
	}
	return out, nil
}

// dataRanges lists the [start, end) ranges of the file below limit that may
// hold data, using SEEK_DATA/SEEK_HOLE; where those are not supported, the
// whole file is one range.
func dataRanges(f *os.File, limit int64) [][2]int64 {
	st, err := f.Stat()
	if err != nil {
		return [][2]int64{{0, limit}}
	}
	end := st.Size()
	if end > limit {
		end = limit
	}
	var out [][2]int64
	for pos := int64(0); pos < end; {
		data, err := f.Seek(pos, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole from pos to the end of the file
		}
		if err != nil {
			return [][2]int64{{0, end}}
		}
		hole, err := f.Seek(data, seekHole)
		if err != nil {
			return [][2]int64{{0, end}}
		}
		if data >= end {
			break
		}
		if hole > end {
			hole = end
		}
		out = append(out, [2]int64{data, hole})
		pos = hole
	}
	return out
}

var zeroBlock [blockSize]byte

func allZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }
