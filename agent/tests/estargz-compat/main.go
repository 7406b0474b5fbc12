// estargz-compat runs stargz-snapshotter's own estargz package (Debian's
// golang-github-containerd-stargz-snapshotter-dev) against imgstream's layers, both ways:
//
//	estargz-compat verify BLOB TOC_DIGEST   open a blob, verify its TOC and every chunk, list files
//	estargz-compat build TAR BLOB CHUNK     write an eStargz blob from a tar, print TOC digest and diff ID
//	estargz-compat gzip FILE BLOB           compress a file with Go's compress/gzip (default level)
//
// The listing has one line per entry: type, name, mode (octal perm bits), uid, gid, size,
// and the sha256 of a regular file's content or a link's target.
package main

import (
	"compress/gzip"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: estargz-compat verify BLOB TOC_DIGEST | build TAR BLOB CHUNK | gzip FILE BLOB")
	}
	switch os.Args[1] {
	case "verify":
		verify(os.Args[2], os.Args[3])
	case "build":
		chunk, err := strconv.Atoi(os.Args[4])
		check(err)
		build(os.Args[2], os.Args[3], chunk)
	case "gzip":
		gzipFile(os.Args[2], os.Args[3])
	default:
		fail("unknown command " + os.Args[1])
	}
}

func verify(path, tocDigest string) {
	f, err := os.Open(path)
	check(err)
	st, err := f.Stat()
	check(err)
	sr := io.NewSectionReader(f, 0, st.Size())
	r, err := estargz.Open(sr)
	check(err)
	verifier, err := r.VerifyTOC(digest.Digest(tocDigest))
	check(err)
	var lines []string
	var walk func(dir string, e *estargz.TOCEntry)
	walk = func(dir string, e *estargz.TOCEntry) {
		e.ForeachChild(func(base string, ent *estargz.TOCEntry) bool {
			name := base
			if dir != "" {
				name = dir + "/" + base
			}
			content := ""
			kind, size := ent.Type, ent.Size
			switch {
			case ent.Name != name:
				// A hard link: the reader hands out the entry it names.
				kind, size = "hardlink", 0
				content = fmt.Sprintf("%x", sha256.Sum256([]byte(ent.Name)))
			case ent.Type == "reg":
				content = readVerified(r, verifier, sr, name, ent)
			case ent.Type == "symlink":
				content = fmt.Sprintf("%x", sha256.Sum256([]byte(ent.LinkName)))
			}
			lines = append(lines, fmt.Sprintf("%s %s %o %d %d %d %s", kind, name,
				ent.Stat().Mode().Perm(), ent.UID, ent.GID, size, content))
			if ent.Type == "dir" {
				walk(name, ent)
			}
			return true
		})
	}
	root, ok := r.Lookup("")
	if !ok {
		fail("no root")
	}
	walk("", root)
	sort.Strings(lines)
	for _, l := range lines {
		fmt.Println(l)
	}
}

// readVerified reads a file chunk by chunk, checking each against its chunkDigest.
func readVerified(r *estargz.Reader, v estargz.TOCEntryVerifier, sr *io.SectionReader, name string, ent *estargz.TOCEntry) string {
	h := sha256.New()
	for off := int64(0); off < ent.Size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok {
			fail("no chunk of " + name + " at " + strconv.FormatInt(off, 10))
		}
		dv, err := v.Verifier(ce)
		check(err)
		fr, err := r.OpenFile(name)
		check(err)
		buf := make([]byte, ce.ChunkSize)
		_, err = fr.ReadAt(buf, ce.ChunkOffset)
		if err != nil && err != io.EOF {
			check(err)
		}
		dv.Write(buf)
		if !dv.Verified() {
			fail("chunk of " + name + " at " + strconv.FormatInt(off, 10) + " does not match its chunkDigest")
		}
		h.Write(buf)
		off += ce.ChunkSize
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

func build(tarPath, out string, chunk int) {
	f, err := os.Open(tarPath)
	check(err)
	st, err := f.Stat()
	check(err)
	blob, err := estargz.Build(io.NewSectionReader(f, 0, st.Size()), estargz.WithChunkSize(chunk))
	check(err)
	o, err := os.Create(out)
	check(err)
	_, err = io.Copy(o, blob)
	check(err)
	check(blob.Close())
	check(o.Close())
	fmt.Println(blob.TOCDigest())
	fmt.Println(blob.DiffID())
}

// gzipFile writes in as a plain gzip layer the way Go's image tools compress layers: the
// standard library's writer at its default level, closed (an empty final block).
func gzipFile(in, out string) {
	src, err := os.Open(in)
	check(err)
	defer src.Close()
	dst, err := os.Create(out)
	check(err)
	w := gzip.NewWriter(dst)
	_, err = io.Copy(w, src)
	check(err)
	check(w.Close())
	check(dst.Close())
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "estargz-compat:", msg)
	os.Exit(1)
}
