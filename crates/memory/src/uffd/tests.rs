//! Unit tests of the Uffd backend: the ABI, the message, the handshake's edge cases.

use std::io::Write;

use super::*;

#[test]
fn ioctl_numbers_match_linux_userfaultfd_h() {
    // The values the C header computes on x86_64.
    assert_eq!(UFFDIO_API, 0xc018_aa3f);
    assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
    assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    assert_eq!(UFFDIO_COPY, 0xc028_aa03);
    assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    assert_eq!(size_of::<UffdMsg>(), 32);
}

#[test]
fn regions_serialize_as_firecracker_s_message() {
    let json =
        serde_json::to_string(&[UffdRegion::new(0x7f00_0000_0000, 0x10_0000, 0, 4096)]).unwrap();
    assert_eq!(
        json,
        r#"[{"base_host_virt_addr":139637976727552,"size":1048576,"offset":0,"page_size":4096,"page_size_kib":4096}]"#
    );
    // A message without the deprecated field parses too.
    let regions = parse_regions(
        br#"[{"base_host_virt_addr":4096,"size":8192,"offset":4096,"page_size":4096}]"#,
    )
    .unwrap();
    assert_eq!(
        regions,
        [UffdRegion {
            page_size_kib: 0,
            ..UffdRegion::new(4096, 8192, 4096, 4096)
        }]
    );
}

#[test]
fn malformed_messages_are_refused() {
    let bad: &[(&[u8], &str)] = &[
        (b"{\"a\":1}", "not a JSON array"),
        (b"[]", "no regions"),
        (b"[{\"size\":1}]", "not a JSON array"),
        (
            br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":3000}]"#,
            "page size 0xbb8",
        ),
        (
            br#"[{"base_host_virt_addr":0,"size":2199023255552,"offset":0,"page_size":2199023255552}]"#,
            "from 4 KiB to 1 GiB",
        ),
        (
            br#"[{"base_host_virt_addr":4097,"size":4096,"offset":0,"page_size":4096}]"#,
            "not a multiple",
        ),
        (
            br#"[{"base_host_virt_addr":4096,"size":0,"offset":0,"page_size":4096}]"#,
            "empty",
        ),
        (
            br#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]"#,
            "address space",
        ),
        (
            br#"[{"base_host_virt_addr":4096,"size":8192,"offset":18446744073709547520,"page_size":4096}]"#,
            "file offset",
        ),
    ];
    for (message, what) in bad {
        let err = parse_regions(message).unwrap_err();
        let text = match &err {
            Error::Message(_) => "not a JSON array".to_string(),
            other => other.to_string(),
        };
        assert!(
            text.contains(what),
            "{}: {text}",
            String::from_utf8_lossy(message)
        );
    }
    let many = format!(
        "[{}]",
        vec![
            r#"{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}"#;
            MAX_REGIONS + 1
        ]
        .join(",")
    );
    assert!(matches!(
        parse_regions(many.as_bytes()),
        Err(Error::InvalidRegion {
            index: MAX_REGIONS,
            ..
        })
    ));
}

#[test]
fn a_message_split_over_several_reads_is_put_back_together() {
    let (vmm, handler) = UnixStream::pair().unwrap();
    let message = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#;
    let (first, rest) = message.split_at(20);
    let fd = File::open("/dev/null").unwrap();
    send_with_fd(&vmm, first, fd.as_fd()).unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(20));
        (&vmm).write_all(rest).unwrap();
        vmm
    });
    let (regions, received) = receive_handshake(&handler).unwrap();
    assert_eq!(regions.len(), 1);
    assert_eq!(regions[0].size, 8192);
    assert_ne!(received.as_raw_fd(), fd.as_raw_fd());
    drop(writer.join().unwrap());
}

#[test]
fn a_message_without_a_descriptor_or_cut_short_is_refused() {
    let (vmm, handler) = UnixStream::pair().unwrap();
    (&vmm).write_all(b"[]").unwrap();
    assert!(matches!(
        receive_handshake(&handler),
        Err(Error::NoDescriptor)
    ));

    let (vmm, handler) = UnixStream::pair().unwrap();
    (&vmm).write_all(b"[{\"base_host_virt_addr\":").unwrap();
    drop(vmm);
    assert!(matches!(
        receive_handshake(&handler),
        Err(Error::Disconnected)
    ));

    let (vmm, handler) = UnixStream::pair().unwrap();
    let fd = File::open("/dev/null").unwrap();
    send_with_fd(&vmm, b"not json", fd.as_fd()).unwrap();
    assert!(matches!(
        receive_handshake(&handler),
        Err(Error::Message(_))
    ));
}

#[test]
fn an_endless_message_is_cut_off_at_the_limit() {
    let (vmm, handler) = UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        let fd = File::open("/dev/null").unwrap();
        send_with_fd(&vmm, b"[", fd.as_fd()).unwrap();
        let chunk = [b' '; 4096];
        // Stops once the handler has given up and closed its end.
        while (&vmm).write_all(&chunk).is_ok() {}
    });
    assert!(matches!(
        receive_handshake(&handler),
        Err(Error::MessageTooLong)
    ));
    drop(handler);
    writer.join().unwrap();
}

#[test]
fn regions_past_the_end_of_the_memory_file_are_refused() {
    let (_, fd) = UnixStream::pair().unwrap();
    let file = File::open("/proc/self/exe").unwrap();
    let len = file.metadata().unwrap().len();
    let region = UffdRegion::new(1 << 30, 1 << 30, 0, PAGE_SIZE);
    assert!(len < 1 << 30);
    let err = FaultHandler::new(fd.into(), vec![region], &file).unwrap_err();
    assert!(
        matches!(err, Error::InvalidRegion { index: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("pass the end"), "{err}");
}

#[test]
fn removed_bits_cover_partial_pages_and_ignore_out_of_range() {
    let mut bits = vec![0u64; 2];
    set_bit(&mut bits, 0);
    set_bit(&mut bits, 127);
    set_bit(&mut bits, 128);
    assert!(get_bit(&bits, 0) && get_bit(&bits, 127));
    assert!(!get_bit(&bits, 1) && !get_bit(&bits, 128) && !get_bit(&bits, u64::MAX));
}
